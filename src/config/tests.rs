//! Tests of the configuration: defaults, file then environment, errors, durations.

use std::path::Path;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_match_the_protocol() {
    let c = Config::from_toml_and_env("", env(&[])).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.engineio.ping_interval, 25_000);
    assert_eq!(c.engineio.max_payload, 1_000_000);
    assert_eq!(c.limits.max_text_bytes, 4096);
    assert_eq!(c.limits.max_rooms_per_conn, 100);
    assert_eq!(c.limits.dedupe_window.0, Duration::from_secs(600));
    assert_eq!(c.limits.max_connections_per_user, 64);
    assert_eq!(c.limits.connect_rate_per_ip, 100.0);
    assert_eq!(c.limits.connect_burst_per_ip, 20_000.0);
    assert_eq!(c.history.max_replay, 1000);
    assert_eq!(c.store.kind, StoreKind::Embedded);
    assert!(c.redis.url.is_none());
    assert!(c.server.pin_shards);
}

#[test]
fn file_then_env() {
    let c = Config::from_toml_and_env(
        "[limits]\nmax_text_bytes = 10\nsend_rate = 3\n[server]\nlisten = \"127.0.0.1:9000\"",
        env(&[
            ("CORELAY_LIMITS_MAX_TEXT_BYTES", "20"),
            ("CORELAY_JWT_SECRET", "0123456789abcdef0123"),
            ("CORELAY_LIMITS_DEDUPE_WINDOW", "30s"),
            ("CORELAY_STORE_KIND", "memory"),
            ("CORELAY_SERVER_PIN_SHARDS", "false"),
            ("CORELAY_SERVER_DEMO_PAGE", "true"),
            ("CORELAY_TEST_SCYLLA", "ignored"),
            ("PATH", "/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(c.limits.max_text_bytes, 20);
    assert_eq!(c.limits.send_rate, 3.0);
    assert_eq!(c.server.listen.port(), 9000);
    assert_eq!(c.auth.jwt_secret.as_deref(), Some("0123456789abcdef0123"));
    assert_eq!(c.limits.dedupe_window.0, Duration::from_secs(30));
    assert_eq!(c.store.kind, StoreKind::Memory);
    assert!(!c.server.pin_shards);
    assert_eq!(c.server.demo_page, Some(true));
}

#[test]
fn errors_are_clear() {
    let e = Config::from_toml_and_env("[limits]\nmax_txt = 1", env(&[])).unwrap_err();
    assert!(e.to_string().contains("max_txt"), "{e}");
    let e = Config::from_toml_and_env("[server]\nshards = 0", env(&[])).unwrap_err();
    assert!(e.to_string().contains("server.shards"), "{e}");
    let e = Config::from_toml_and_env("", env(&[("CORELAY_STORE_KIND", "mongo")])).unwrap_err();
    assert!(e.to_string().contains("mongo"), "{e}");
    let e = Config::from_toml_and_env("[limits]\nconnect_rate_per_ip = -1", env(&[])).unwrap_err();
    assert!(e.to_string().contains("connect_rate_per_ip"), "{e}");
    let e = Config::from_toml_and_env(
        "[limits]\nconnect_rate_per_ip = 5\nconnect_burst_per_ip = 0.5",
        env(&[]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("connect_burst_per_ip"), "{e}");
    let e = Config::from_toml_and_env("[server\n", env(&[])).unwrap_err();
    assert!(e.to_string().starts_with("invalid configuration"), "{e}");
}

#[test]
fn cluster_keys() {
    let c = Config::from_toml_and_env("", env(&[])).unwrap();
    assert_eq!(c.history.max_len, 10_000);
    assert_eq!(c.history.max_age, None);
    assert_eq!(c.presence.ttl.0, Duration::from_secs(30));
    let c = Config::from_toml_and_env(
        "[redis]\nurl = \"redis://:pw@h:1/0\"\ncommand_timeout = \"500ms\"\n[history]\nmax_age = \"1d\"",
        env(&[
            ("CORELAY_REDIS_SHARDED", "true"),
            ("CORELAY_PRESENCE_TTL", "10s"),
            ("CORELAY_HISTORY_MAX_LEN", "50"),
            ("CORELAY_REDIS_TLS_CA_FILE", "/etc/ca.pem"),
        ]),
    )
    .unwrap();
    // `cluster::RedisOptions::from_config` turns these into the cluster layer's options
    // (tested there).
    assert!(c.redis.sharded);
    assert_eq!(c.redis.command_timeout.0, Duration::from_millis(500));
    assert_eq!(c.presence.ttl.0, Duration::from_secs(10));
    assert_eq!(c.history.max_len, 50);
    assert_eq!(
        c.history.max_age.map(|d| d.0),
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(
        c.redis.tls_ca_file.as_deref(),
        Some(Path::new("/etc/ca.pem"))
    );
    assert!(!format!("{c:?}").contains(":pw@"));
    let e = Config::from_toml_and_env("[presence]\nttl = \"0s\"", env(&[])).unwrap_err();
    assert!(e.to_string().contains("presence.ttl"), "{e}");
}

#[test]
fn emitter_keys() {
    let c = Config::from_toml_and_env("", env(&[])).unwrap();
    assert!(!c.emitter.enabled);
    assert_eq!(c.emitter.prefix, "socket.io");
    let c = Config::from_toml_and_env(
        "[emitter]\nprefix = \"chat\"",
        env(&[("CORELAY_EMITTER_ENABLED", "true")]),
    )
    .unwrap();
    assert!(c.emitter.enabled);
    assert_eq!(c.emitter.prefix, "chat");
    let e = Config::from_toml_and_env("[emitter]\nprefix = \"\"", env(&[])).unwrap_err();
    assert!(e.to_string().contains("emitter.prefix"), "{e}");
}

#[test]
fn durations() {
    assert_eq!(
        HumanDuration::parse("1h").unwrap().0,
        Duration::from_secs(3600)
    );
    assert_eq!(
        HumanDuration::parse("250ms").unwrap().0,
        Duration::from_millis(250)
    );
    assert_eq!(
        HumanDuration::parse("12").unwrap().0,
        Duration::from_secs(12)
    );
    assert!(HumanDuration::parse("soon").is_err());
    assert!(HumanDuration::parse("5y").is_err());
}

#[test]
fn hooks_from_env_and_their_checks() {
    let c = Config::from_toml_and_env(
        "[hooks]\nurl = \"http://127.0.0.1:3000\"\npublish = true",
        env(&[
            ("CORELAY_HOOKS_ON_FAILURE", "allow"),
            ("CORELAY_HOOKS_TIMEOUT", "500ms"),
            ("CORELAY_HOOKS_RPC", "true"),
            ("CORELAY_HOOKS_SECRET", "s3cret"),
        ]),
    )
    .unwrap();
    assert!(c.hooks.publish && c.hooks.rpc && !c.hooks.join && !c.hooks.connect);
    assert_eq!(c.hooks.on_failure, OnFailure::Allow);
    assert_eq!(c.hooks.timeout.0, Duration::from_millis(500));
    assert_eq!(c.hooks.max_connections, 16);
    assert!(!format!("{:?}", c.hooks).contains("s3cret"));
    let d = Config::from_toml_and_env("", env(&[])).unwrap();
    assert!(!d.hooks.any() && d.hooks.on_failure == OnFailure::Deny);
    assert_eq!(d.hooks.timeout.0, Duration::from_secs(2));

    let e = Config::from_toml_and_env("[hooks]\njoin = true", env(&[])).unwrap_err();
    assert!(e.to_string().contains("hooks.url is not set"), "{e}");
    let e = Config::from_toml_and_env("", env(&[("CORELAY_HOOKS_URL", "ftp://x")])).unwrap_err();
    assert!(e.to_string().contains("http:// or https://"), "{e}");
    let e = Config::from_toml_and_env("[hooks]\non_failure = \"maybe\"", env(&[])).unwrap_err();
    assert!(e.to_string().contains("maybe"), "{e}");
}

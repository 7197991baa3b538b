//! The application's backend in the loop (PROTOCOL.md, "Hooks"), against the real binary
//! and a real HTTP backend started by the test: each hook's allow, deny and rewrite, the
//! signature, bad answers under both failure policies, a slow backend beside another
//! connection, a connection's order behind its pending publish hook, and https.

mod common;
mod common_hooks;
mod common_redis;

use std::time::{Duration, Instant};

use common::{token, Server, WsClient};
use common_hooks::{Backend, Reply, Seen};
use serde_json::{json, Value};

const HOOK_SECRET: &str = "hook-secret-for-tests";

/// One shard, the memory store, every hook on against `url`, and `env` on top.
fn start(url: &str, env: &[(&str, &str)]) -> Server {
    let mut all = vec![
        ("CORELAY_HOOKS_URL", url),
        ("CORELAY_HOOKS_SECRET", HOOK_SECRET),
        ("CORELAY_HOOKS_CONNECT", "true"),
        ("CORELAY_HOOKS_JOIN", "true"),
        ("CORELAY_HOOKS_PUBLISH", "true"),
        ("CORELAY_HOOKS_RPC", "true"),
    ];
    all.extend_from_slice(env);
    Server::start_sharded(1, &all, &["--store", "memory"], true)
}

/// A client connected with a JWT for `user` allowed in `lobby`, and in it.
fn in_lobby(port: u16, user: &str) -> WsClient {
    let mut c = WsClient::connect(port, &token(user, Some(&["lobby"])));
    assert_eq!(c.emit_ack("join", json!({"room": "lobby"}))["ok"], true);
    c
}

/// The value of one exact series (`name{labels}`) in /metrics.
fn series(server: &Server, series: &str) -> f64 {
    let (_, body) = server.get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// The example rules: who connects, which rooms need the backend, bad words, rpc.
fn rules(seen: &Seen) -> Reply {
    let b = &seen.body;
    Reply::Json(match seen.hook() {
        "connect" => match b["auth"]["session"].as_str() {
            Some("mallory") => json!({"error": {"code": "banned", "message": "go away"}}),
            Some(user) => json!({"user": user, "name": "From Backend", "rooms": ["lobby"]}),
            None => json!({"error": {"code": "unauthorized", "message": "no session"}}),
        },
        "join" => match b["room"].as_str() {
            Some("club") => json!({"ok": true}),
            Some("vault") => json!({"error": {"code": "members_only", "message": "members only"}}),
            _ => json!({"ok": false}),
        },
        "publish" => {
            let text = b["text"].as_str().unwrap_or("");
            if text.contains("spam") {
                json!({"error": {"code": "spam", "message": "no spam"}})
            } else if text.contains("darn") {
                json!({"ok": true, "text": text.replace("darn", "d**n")})
            } else {
                json!({"ok": true})
            }
        }
        "rpc" => match b["event"].as_str() {
            Some("markAsRead") => json!({"result": {"read": b["args"][0]}}),
            _ => json!({"error": {"code": "unknown_rpc", "message": "no such call"}}),
        },
        _ => json!({}),
    })
}

#[test]
fn each_hook_allows_denies_and_rewrites() {
    let backend = Backend::start(rules);
    let server = start(&backend.url(), &[]);
    let mut alice = in_lobby(server.port, "alice");

    // connect: no JWT; the backend knows the session.
    let (mut bob, _) = WsClient::open(server.port);
    bob.send_text(r#"40{"session":"bob"}"#);
    let reply = bob.recv_text(Duration::from_secs(5)).unwrap();
    assert!(reply.starts_with("40{\"sid\":"), "{reply}");
    assert_eq!(bob.emit_ack("join", json!({"room": "lobby"}))["ok"], true);
    let (mut mallory, _) = WsClient::open(server.port);
    mallory.send_text(r#"40{"session":"mallory"}"#);
    let reply = mallory.recv_text(Duration::from_secs(5)).unwrap();
    assert!(reply.starts_with(r#"44{"message":"banned""#), "{reply}");

    // join: granted rooms skip the hook; others ask it.
    assert_eq!(alice.emit_ack("join", json!({"room": "club"}))["ok"], true);
    let vault = alice.emit_ack("join", json!({"room": "vault"}));
    assert_eq!(vault["error"]["code"], "members_only", "{vault}");
    let closed = alice.emit_ack("join", json!({"room": "closed"}));
    assert_eq!(closed["error"]["code"], "forbidden", "{closed}");

    // publish: allowed, rewritten (stored, delivered and acked so), refused.
    let ack = alice.emit_ack("message", json!({"room": "lobby", "text": "hello"}));
    assert_eq!(
        (ack["ok"].clone(), ack["offset"].clone()),
        (json!(true), json!(1))
    );
    let ack = alice.emit_ack(
        "message",
        json!({"room": "lobby", "text": "oh darn", "cid": "c1"}),
    );
    assert_eq!(ack["offset"], 2, "{ack}");
    let spam = alice.emit_ack("message", json!({"room": "lobby", "text": "buy spam"}));
    assert_eq!(spam["error"]["code"], "spam", "{spam}");
    let texts: Vec<Value> = (0..2)
        .map(|_| bob.next_event(Duration::from_secs(5)).unwrap()[1]["text"].clone())
        .collect();
    assert_eq!(texts, [json!("hello"), json!("oh d**n")]);
    let history = alice.emit_ack("history", json!({"room": "lobby"}));
    let stored: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        stored,
        ["hello", "oh d**n"],
        "nothing stored for the refused one"
    );

    // rpc: any other event, with its ack.
    let ack = alice.emit_ack("markAsRead", json!({"room": "lobby", "offset": 2}));
    assert_eq!(
        ack,
        json!({"ok": true, "result": {"read": {"room": "lobby", "offset": 2}}})
    );
    let ack = alice.emit_ack("frobnicate", json!({}));
    assert_eq!(ack["ok"], false);
    assert_eq!(ack["error"]["code"], "unknown_rpc", "{ack}");

    // What the backend was sent: signed, with the documented bodies.
    let seen = backend.seen();
    assert!(seen.iter().all(|s| s.signed_with(HOOK_SECRET)), "{seen:?}");
    let connect = seen.iter().find(|s| s.hook() == "connect").unwrap();
    assert_eq!(connect.body["auth"], json!({"session": "bob"}));
    assert!(connect.body["headers"].is_object());
    assert!(connect.body["remote_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let joins: Vec<&Value> = seen
        .iter()
        .filter(|s| s.hook() == "join")
        .map(|s| &s.body["room"])
        .collect();
    assert_eq!(
        joins,
        ["club", "vault", "closed"],
        "granted rooms never reach the backend"
    );
    let publish = seen.iter().find(|s| s.body["cid"] == "c1").unwrap();
    assert_eq!(
        publish.body,
        json!({"user": "alice", "room": "lobby", "text": "oh darn", "cid": "c1"})
    );
    let rpc = seen.iter().find(|s| s.hook() == "rpc").unwrap();
    assert_eq!(
        rpc.body,
        json!({"user": "alice", "event": "markAsRead", "args": [{"room": "lobby", "offset": 2}]})
    );
    assert_eq!(
        series(&server, "corelay_hook_calls_total{hook=\"publish\"}"),
        3.0
    );
    assert_eq!(
        series(
            &server,
            "corelay_hook_failures_total{hook=\"publish\",reason=\"shape\"}"
        ),
        0.0
    );
}

/// Bad answers, by the message's text: each is a failure counted under its reason.
fn bad_answers(seen: &Seen) -> Reply {
    let raw = |s: &str| Reply::Raw(s.as_bytes().to_vec());
    match seen.body["text"].as_str().unwrap_or("") {
        "not_json" => raw("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        "too_large" => {
            let body = format!("{{\"ok\":true,\"pad\":\"{}\"}}", "x".repeat(70_000));
            raw(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ))
        }
        "shape" => Reply::Json(json!({"allowed": "maybe"})),
        "redirect" => {
            raw("HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")
        }
        "status" => raw("HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"),
        "late" => Reply::After(
            Duration::from_millis(1500),
            Box::new(Reply::Json(json!({"ok": true}))),
        ),
        "dropped" => Reply::Drop,
        _ => Reply::Json(json!({"ok": true})),
    }
}

const BAD: [(&str, &str); 7] = [
    ("not_json", "not_json"),
    ("too_large", "too_large"),
    ("shape", "shape"),
    ("redirect", "redirect"),
    ("status", "status"),
    ("late", "timeout"),
    ("dropped", "io"),
];

#[test]
fn bad_answers_are_failures_under_both_policies() {
    let backend = Backend::start(bad_answers);
    for policy in ["deny", "allow"] {
        let server = start(
            &backend.url(),
            &[
                ("CORELAY_HOOKS_ON_FAILURE", policy),
                ("CORELAY_HOOKS_TIMEOUT", "400ms"),
            ],
        );
        let mut alice = in_lobby(server.port, "alice");
        for (text, reason) in BAD {
            let ack = alice.emit_ack("message", json!({"room": "lobby", "text": text}));
            if policy == "deny" {
                assert_eq!(ack["error"]["code"], "unavailable", "{text}: {ack}");
            } else {
                assert_eq!(ack["ok"], true, "{text}: {ack}");
            }
            let n = series(
                &server,
                &format!("corelay_hook_failures_total{{hook=\"publish\",reason=\"{reason}\"}}"),
            );
            assert_eq!(n, 1.0, "{policy} {text}");
        }
        // The backend is fine again: so are the calls (a fresh connection if need be).
        assert_eq!(
            alice.emit_ack("message", json!({"room": "lobby", "text": "ok"}))["ok"],
            true
        );
        let history = alice.emit_ack("history", json!({"room": "lobby"}));
        let stored = history["messages"].as_array().unwrap().len();
        assert_eq!(
            stored,
            if policy == "deny" { 1 } else { BAD.len() + 1 },
            "{policy}"
        );
        // rpc has no "allow": a failure is an error ack either way.
        let ack = alice.emit_ack("markAsRead", json!({"text": "status"}));
        assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
    }
}

#[test]
fn a_backend_that_refuses_connections_is_a_failure() {
    let port = common::free_port(); // nothing listens there
    for (policy, ok) in [("deny", false), ("allow", true)] {
        let server = start(
            &format!("http://127.0.0.1:{port}"),
            &[("CORELAY_HOOKS_ON_FAILURE", policy)],
        );
        let mut alice = in_lobby(server.port, "alice");
        let ack = alice.emit_ack("message", json!({"room": "lobby", "text": "hi"}));
        assert_eq!(ack["ok"], ok, "{policy}: {ack}");
        let ack = alice.emit_ack("join", json!({"room": "elsewhere"}));
        assert_eq!(ack["ok"], ok, "{policy}: {ack}");
        // A CONNECT without a JWT: unauthorized whatever the policy (no user to allow).
        let (mut anon, _) = WsClient::open(server.port);
        anon.send_text(r#"40{"session":"bob"}"#);
        let reply = anon.recv_text(Duration::from_secs(5)).unwrap();
        assert!(
            reply.starts_with(r#"44{"message":"unauthorized""#),
            "{reply}"
        );
        let n = series(
            &server,
            "corelay_hook_failures_total{hook=\"publish\",reason=\"connect\"}",
        );
        assert_eq!(n, 1.0);
    }
}

/// Publishes by `slow` wait 1 s; those of `m1` 500 ms; the rest answer at once.
fn slow_rules(seen: &Seen) -> Reply {
    let delay = match (seen.body["user"].as_str(), seen.body["text"].as_str()) {
        (Some("slow"), _) => 1000,
        (_, Some("m1")) => 500,
        _ => 0,
    };
    Reply::After(
        Duration::from_millis(delay),
        Box::new(Reply::Json(json!({"ok": true}))),
    )
}

#[test]
fn a_slow_backend_stalls_no_other_connection() {
    let backend = Backend::start(slow_rules);
    let server = start(&backend.url(), &[]);
    let mut slow = in_lobby(server.port, "slow");
    let mut quick = in_lobby(server.port, "quick");
    slow.send_text(r#"4277["message",{"room":"lobby","text":"s"}]"#);
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    for i in 0..5 {
        let ack = quick.emit_ack("message", json!({"room": "lobby", "text": format!("q{i}")}));
        assert_eq!(ack["ok"], true);
    }
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "another connection waited for the slow hook: {:?}",
        started.elapsed()
    );
    assert_eq!(
        slow.wait_ack(77)["offset"],
        6,
        "the slow one is sequenced when answered"
    );
}

#[test]
fn a_connections_messages_keep_their_order_behind_a_pending_publish() {
    let backend = Backend::start(slow_rules);
    let server = start(&backend.url(), &[]);
    let mut alice = in_lobby(server.port, "alice");
    let mut bob = in_lobby(server.port, "bob");
    // Three messages in one go; the first one's hook takes 500 ms, the others' none.
    for (id, text) in [(11, "m1"), (12, "m2"), (13, "m3")] {
        alice.send_text(&format!(
            r#"42{id}["message",{{"room":"lobby","text":"{text}"}}]"#
        ));
    }
    let offsets: Vec<Value> = (11..14)
        .map(|id| alice.wait_ack(id)["offset"].clone())
        .collect();
    assert_eq!(offsets, [json!(1), json!(2), json!(3)]);
    let delivered: Vec<Value> = (0..3)
        .map(|_| bob.next_event(Duration::from_secs(5)).unwrap()[1]["text"].clone())
        .collect();
    assert_eq!(delivered, [json!("m1"), json!("m2"), json!("m3")]);
    let history = alice.emit_ack("history", json!({"room": "lobby"}));
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m1", "m2", "m3"]);
}

#[test]
fn https_backend_with_its_own_ca() {
    let tls =
        common_redis::TlsFiles::generate().expect("test certificates (apt-get install openssl)");
    let backend = Backend::start_tls(rules, &tls.server_cert, &tls.server_key);
    let url = format!("https://localhost:{}/hooks", backend.port);
    let ca = tls.ca_cert.display().to_string();
    let server = start(&url, &[("CORELAY_HOOKS_TLS_CA_FILE", &ca)]);
    let mut alice = in_lobby(server.port, "alice");
    for _ in 0..2 {
        let ack = alice.emit_ack("message", json!({"room": "lobby", "text": "darn tls"}));
        assert_eq!(ack["ok"], true, "{ack}");
    }
    let history = alice.emit_ack("history", json!({"room": "lobby"}));
    assert_eq!(history["messages"][0]["text"], "d**n tls");
    assert_eq!(backend.seen().len(), 2);
    // Without the CA, the self-signed certificate is refused: a failure (deny).
    let server = start(&url, &[]);
    let mut alice = in_lobby(server.port, "alice");
    let ack = alice.emit_ack("message", json!({"room": "lobby", "text": "x"}));
    assert_eq!(ack["error"]["code"], "unavailable", "{ack}");
}

#[test]
fn a_kept_alive_connection_the_backend_closed_is_replaced_and_the_pool_is_bounded() {
    // The backend closes each connection after its answer, as an idle one times out.
    let backend = Backend::start(|_| Reply::ThenClose(Box::new(Reply::Json(json!({"ok": true})))));
    let server = start(&backend.url(), &[]);
    let mut alice = in_lobby(server.port, "alice");
    for text in ["a", "b", "c"] {
        std::thread::sleep(Duration::from_millis(100));
        let ack = alice.emit_ack("message", json!({"room": "lobby", "text": text}));
        assert_eq!(ack["ok"], true, "{text}: {ack}");
    }
    assert_eq!(
        backend.seen().len(),
        3,
        "each call reached the backend once"
    );

    // One connection per shard: a second call waits for the first one's.
    let backend = Backend::start(slow_rules);
    let server = start(&backend.url(), &[("CORELAY_HOOKS_MAX_CONNECTIONS", "1")]);
    let (mut a, mut b) = (in_lobby(server.port, "alice"), in_lobby(server.port, "bob"));
    let started = Instant::now();
    a.send_text(r#"4221["message",{"room":"lobby","text":"m1"}]"#);
    b.send_text(r#"4222["message",{"room":"lobby","text":"m1"}]"#);
    assert_eq!(a.wait_ack(21)["ok"], true);
    assert_eq!(b.wait_ack(22)["ok"], true);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn packets_past_the_hold_limit_behind_a_pending_hook_are_refused_not_queued() {
    let backend = Backend::start(slow_rules);
    let server = start(&backend.url(), &[]);
    let mut alice = in_lobby(server.port, "alice");
    alice.send_text(r#"42100["message",{"room":"lobby","text":"m1"}]"#);
    // 64 are held behind the 500 ms hook; the 65th is refused at once.
    for id in 101..=165 {
        alice.send_text(&format!(r#"42{id}["presence",{{"room":"lobby"}}]"#));
    }
    let refused = alice.wait_ack(165);
    assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    assert_eq!(alice.wait_ack(100)["offset"], 1);
    assert_eq!(alice.wait_ack(164)["ok"], true, "the held ones are handled");
}

//! Checks on the deployment files in `deploy/`: the systemd unit verifies cleanly and
//! keeps io_uring allowed, the sample configuration loads and documents every key with
//! its real default, and the unit, sysctl and PAM limits files agree with each other.
//!
//! `systemd-analyze` (Debian package `systemd`) is needed for the unit checks; without
//! it they print "skipped: systemd-analyze not installed" and pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use corelay::config::Config;

/// A file under `deploy/`.
fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

fn read(rel: &str) -> String {
    let path = deploy(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The path of `systemd-analyze`, or `None` (after saying so) when it is not installed.
fn systemd_analyze() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join("systemd-analyze"))
        .find(|p| p.is_file());
    if found.is_none() {
        println!("skipped: systemd-analyze not installed");
    }
    found
}

/// The unit's `[Service]` (and `[Unit]`) assignments: key → values, in file order.
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('[')
        {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line without '=': {line:?}"));
        settings
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    settings
}

/// The single value of `key` in the unit.
fn one<'a>(settings: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match settings.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("corelay.service: expected one {key}=, found {other:?}"),
    }
}

/// A systemd size (`64M`, `1G`, `65536`) in bytes.
fn unit_bytes(v: &str) -> u64 {
    let (num, mult) = match v.chars().last() {
        Some('K') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M') => (&v[..v.len() - 1], 1 << 20),
        Some('G') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().expect("a size") * mult
}

#[test]
fn unit_verifies_cleanly() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // `verify` checks that ExecStart's binary exists: point it at the binary cargo built,
    // keep everything else (User=, paths, sandboxing) as shipped.
    let unit = read("corelay.service");
    let exec = "ExecStart=/usr/local/bin/corelay ";
    assert_eq!(unit.matches(exec).count(), 1, "one ExecStart={exec}…");
    let local = unit.replace(
        exec,
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_corelay")),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corelay.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{text}",
        out.status
    );
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify reported:\n{text}"
    );
}

#[test]
fn unit_has_the_operational_settings() {
    let s = unit_settings(&read("corelay.service"));
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        (
            "ExecStart",
            "/usr/local/bin/corelay serve --config /etc/corelay/corelay.toml",
        ),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("User", "corelay"),
        ("Group", "corelay"),
        ("DynamicUser", "no"),
        ("LimitNOFILE", "1048576"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "corelay"),
        ("ReadWritePaths", "/var/lib/corelay"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("EnvironmentFile", "-/etc/corelay/env"),
    ] {
        assert_eq!(one(&s, key), want, "corelay.service {key}=");
    }
    for key in [
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
    ] {
        assert_eq!(one(&s, key), "yes", "corelay.service {key}=");
    }
    // Secrets never live in the unit (it is world-readable).
    for v in s.get("Environment").into_iter().flatten() {
        assert!(
            !v.contains("SECRET") && !v.contains("API_KEY") && !v.contains("PASSWORD"),
            "a secret in Environment=: {v}"
        );
    }

    // The stop timeout leaves room for the drain the sample configuration allows.
    let config = Config::from_toml_and_env(&read("corelay.toml"), Vec::new()).unwrap();
    let stop = corelay::config::HumanDuration::parse(one(&s, "TimeoutStopSec"))
        .unwrap()
        .0;
    let drain = config.server.shutdown_timeout.0;
    assert!(
        stop >= drain + Duration::from_secs(5),
        "TimeoutStopSec={stop:?} must stay a few seconds above server.shutdown_timeout={drain:?}"
    );

    // Locked memory: each shard registers io_memory with its 3 io_uring rings; the unit's
    // comment promises room for 64 shards at the sample's io_memory.
    let memlock = unit_bytes(one(&s, "LimitMEMLOCK"));
    let need = 64 * 3 * config.server.io_memory as u64;
    assert!(
        memlock >= need,
        "LimitMEMLOCK={memlock} is below 64 shards × 3 rings × io_memory = {need}"
    );
}

/// Every system call in a `systemd-analyze syscall-filter` group, nested groups expanded.
fn expand_syscall_group(
    analyze: &Path,
    group: &str,
    seen: &mut BTreeSet<String>,
) -> BTreeSet<String> {
    let mut calls = BTreeSet::new();
    if !seen.insert(group.to_string()) {
        return calls;
    }
    let out = Command::new(analyze)
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .expect("run systemd-analyze syscall-filter");
    assert!(out.status.success(), "unknown system call group {group}");
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.starts_with('@') {
            calls.extend(expand_syscall_group(analyze, name, seen));
        } else {
            calls.insert(name.to_string());
        }
    }
    calls
}

#[test]
fn syscall_filter_keeps_io_uring_and_pinning() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // glommio cannot run without these (io_uring) or pin its shards (affinity).
    let needed = [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "sched_setaffinity",
    ];
    let s = unit_settings(&read("corelay.service"));
    for filter in s.get("SystemCallFilter").into_iter().flatten() {
        let (deny, list) = match filter.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, filter.as_str()),
        };
        let mut names = BTreeSet::new();
        for item in list.split_whitespace() {
            if item.starts_with('@') {
                names.extend(expand_syscall_group(&analyze, item, &mut BTreeSet::new()));
            } else {
                names.insert(item.to_string());
            }
        }
        for call in needed {
            if deny {
                assert!(
                    !names.contains(call),
                    "SystemCallFilter={filter} denies {call}"
                );
            } else {
                assert!(
                    names.contains(call),
                    "SystemCallFilter={filter} does not allow {call}"
                );
            }
        }
    }
}

/// The sample configuration's keys, per section: the keys set, and the keys shown
/// commented out (`#key = …`) for settings without a default value.
fn sample_keys(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let body = line.strip_prefix('#').unwrap_or(line).trim_start();
        if let Some((key, _)) = body.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                keys.entry(section.clone())
                    .or_default()
                    .insert(key.to_string());
            }
        }
    }
    keys
}

/// The keys a configuration section accepts (`None`: the sections), read from the
/// configuration's own "unknown field" error, which lists them all, so keys added to
/// src/config/ are noticed here.
fn accepted_keys(section: Option<&str>) -> BTreeSet<String> {
    let probe = match section {
        Some(section) => format!("[{section}]\n__probe__ = 1\n"),
        None => "__probe__ = 1\n".to_string(),
    };
    let err = Config::from_toml_and_env(&probe, Vec::new())
        .expect_err("an unknown key is refused")
        .to_string();
    let (_, expected) = err
        .split_once("expected")
        .unwrap_or_else(|| panic!("no key list in: {err}"));
    let expected = expected.lines().next().unwrap_or_default();
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn sample_config_loads() {
    let path = deploy("corelay.toml");
    Config::load(Some(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn sample_config_documents_every_key() {
    let text = read("corelay.toml");
    let documented = sample_keys(&text);
    let sections = accepted_keys(None);
    for section in &sections {
        let accepted = accepted_keys(Some(section));
        let have = documented.get(section).cloned().unwrap_or_default();
        let missing: Vec<_> = accepted.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "deploy/corelay.toml does not document [{section}] {missing:?}"
        );
        let unknown: Vec<_> = have.difference(&accepted).collect();
        assert!(
            unknown.is_empty(),
            "deploy/corelay.toml documents unknown [{section}] keys {unknown:?}"
        );
    }
    let shown: BTreeSet<String> = documented
        .keys()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    assert_eq!(shown, sections, "sections of deploy/corelay.toml");
}

#[test]
fn sample_config_shows_the_real_defaults() {
    // Hermetic: no CORELAY_* variables from the test's environment.
    let loaded = Config::from_toml_and_env(&read("corelay.toml"), Vec::new()).unwrap();
    // The sample sets two values for a production host; every other value it shows is
    // the default (Debug prints secrets and the Redis URL as <set> or None).
    let mut expected = Config::default();
    expected.server.listen = "0.0.0.0:8080".parse().unwrap();
    expected.server.data_dir = PathBuf::from("/var/lib/corelay/data");
    assert_eq!(
        format!("{loaded:#?}"),
        format!("{expected:#?}"),
        "deploy/corelay.toml must show the defaults of src/config/"
    );
    assert!(
        loaded.redis.url.is_none(),
        "the sample must run as a single host"
    );
    assert!(loaded.auth.jwt_secret.is_none() && loaded.auth.api_key.is_none());
}

#[test]
fn limits_and_sysctl_agree_with_the_unit() {
    let s = unit_settings(&read("corelay.service"));
    let nofile: u64 = one(&s, "LimitNOFILE").parse().unwrap();
    let memlock = unit_bytes(one(&s, "LimitMEMLOCK"));

    // limits.d: `corelay soft|hard nofile|memlock value` (memlock in KiB).
    let mut seen = BTreeSet::new();
    for line in read("limits.d/corelay.conf").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 4, "limits.d line {line:?}");
        assert_eq!(f[0], "corelay", "limits.d line {line:?}");
        assert!(f[1] == "soft" || f[1] == "hard", "limits.d line {line:?}");
        let value: u64 = f[3].parse().unwrap();
        match f[2] {
            "nofile" => assert_eq!(value, nofile, "limits.d nofile vs LimitNOFILE"),
            "memlock" => assert_eq!(value * 1024, memlock, "limits.d memlock vs LimitMEMLOCK"),
            other => panic!("unexpected limit {other}"),
        }
        seen.insert((f[1].to_string(), f[2].to_string()));
    }
    assert_eq!(seen.len(), 4, "soft and hard nofile and memlock: {seen:?}");

    // sysctl.d: `[-]key = value`; the descriptor limits leave room for LimitNOFILE.
    let mut sysctl = BTreeMap::new();
    for line in read("sysctl.d/90-corelay.conf").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("sysctl line {line:?}"));
        let k = k.trim().trim_start_matches('-');
        assert!(
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)),
            "sysctl key {k:?}"
        );
        sysctl.insert(k.to_string(), v.trim().to_string());
    }
    let num = |k: &str| -> u64 {
        sysctl
            .get(k)
            .unwrap_or_else(|| panic!("sysctl {k} missing"))
            .parse()
            .unwrap()
    };
    assert!(num("fs.nr_open") >= nofile, "fs.nr_open below LimitNOFILE");
    assert!(
        num("fs.file-max") >= nofile,
        "fs.file-max below LimitNOFILE"
    );
    assert!(num("net.core.somaxconn") >= 4096);
    let range: Vec<u64> = sysctl["net.ipv4.ip_local_port_range"]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(range.len() == 2 && range[0] >= 1024 && range[0] < range[1] && range[1] <= 65535);
}

#[test]
fn dashboard_and_readme_use_real_metric_names() {
    let exported = corelay::metrics::Metrics::new(1).render_prometheus(true);
    let names: BTreeSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for file in ["grafana-dashboard.json", "README.md"] {
        let text = read(file);
        let mut used = BTreeSet::new();
        for (i, _) in text.match_indices("corelay_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.insert(name);
        }
        assert!(!used.is_empty(), "{file} names no metric");
        for name in &used {
            // A histogram's name stands for its _bucket, _sum and _count series.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            let bucket = format!("{base}_bucket");
            assert!(
                names.contains(name.as_str()) || names.contains(bucket.as_str()),
                "deploy/{file} uses {name}, which /metrics does not export"
            );
        }
    }
}

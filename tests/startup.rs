//! Start-up: refusals with a clear message and a non-zero exit (an unusable data
//! directory: in use by another server, not writable), and where the shards run.

mod common;

use common::{free_port, Server, SECRET};

fn serve_fails(args: &[&str]) -> String {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corelay"))
        .args(["serve", "--listen", &listen])
        .args(args)
        .env("CORELAY_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_data_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _first = Server::start_with(
        &[],
        &["--store", "embedded", "--data-dir", data.to_str().unwrap()],
        true,
    );
    let err = serve_fails(&["--data-dir", data.to_str().unwrap()]);
    assert!(err.contains("in use by another corelay process"), "{err}");
}

#[test]
fn an_unwritable_data_dir_is_refused() {
    let err = serve_fails(&["--data-dir", "/proc/corelay-cannot-live-here"]);
    assert!(err.contains("cannot open store"), "{err}");
    assert!(err.contains("/proc/corelay-cannot-live-here"), "{err}");
}

/// The CPUs each shard of `pid` may run on, read from /proc (`Cpus_allowed_list`), in
/// shard order. glommio gives a shard's helper thread the shard's name too, and that thread
/// pins itself only once it runs (it starts with the mask of the thread that spawned it), so
/// on a busy machine it can briefly disagree with its shard: this waits up to 5 s for all
/// threads of a shard to agree before calling it a failure.
fn shard_cpus(pid: u32) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match shard_cpus_now(pid) {
            Ok(cpus) => return cpus,
            Err(e) if std::time::Instant::now() >= deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// One reading for [`shard_cpus`]; an error when two threads of one shard disagree.
fn shard_cpus_now(pid: u32) -> Result<Vec<String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("corelay-shard") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            let cpus = line["Cpus_allowed_list:".len()..].trim().to_string();
            let name = comm.trim().to_string();
            if let Some(seen) = out.insert(name.clone(), cpus.clone()) {
                if seen != cpus {
                    return Err(format!("{name}'s threads disagree: {seen} and {cpus}"));
                }
            }
        }
    }
    Ok(out.into_values().collect())
}

/// Shards are pinned one per core by default, and `--no-pin` (`server.pin_shards = false`)
/// leaves them to the kernel: each shard thread may then run on every core the process may.
/// Fewer shards than cores are never pinned (two such processes would share the first cores).
#[test]
fn shards_are_pinned_unless_told_not_to() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let all = own
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    // `Server` runs two shards: pinned only when the process may use exactly two cores.
    let cores = core_affinity::get_core_ids().unwrap_or_default().len();

    let pinned = Server::start(&[]);
    let cpus = shard_cpus(pinned.pid());
    assert_eq!(cpus.len(), 2, "{cpus:?}");
    if cores == 2 {
        for c in &cpus {
            assert!(
                c.parse::<usize>().is_ok(),
                "a pinned shard runs on one core: {cpus:?}"
            );
        }
        assert_ne!(cpus[0], cpus[1], "one core each: {cpus:?}");
    } else {
        eprintln!("{cores} cores: the pinned case is not checked here");
    }
    drop(pinned);

    let unpinned = Server::start_with(&[], &["--store", "memory", "--no-pin"], true);
    let cpus = shard_cpus(unpinned.pid());
    assert_eq!(cpus.len(), 2, "{cpus:?}");
    assert!(
        cpus.iter().all(|c| *c == all),
        "unpinned: {cpus:?}, process: {all}"
    );
    drop(unpinned);

    let by_env = Server::start(&[("CORELAY_SERVER_PIN_SHARDS", "false")]);
    let cpus = shard_cpus(by_env.pid());
    assert!(cpus.iter().all(|c| *c == all), "unpinned by env: {cpus:?}");
    drop(by_env);

    if cores >= 2 {
        let one = Server::start_sharded(1, &[], &["--store", "memory"], true);
        let cpus = shard_cpus(one.pid());
        assert_eq!(
            cpus,
            vec![all.clone()],
            "one shard of {cores} cores is not pinned"
        );
    }
}

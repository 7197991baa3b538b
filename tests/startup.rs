//! Start-up refusals with a clear message and a non-zero exit: an unusable data
//! directory (in use by another server, not writable).

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

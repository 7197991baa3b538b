//! systemd readiness notification (`sd_notify`), written by hand: one datagram to the
//! socket named by `$NOTIFY_SOCKET`, no dependency on libsystemd.
//!
//! `deploy/corelay.service` runs corelay as `Type=notify` with `NotifyAccess=main`:
//! systemd considers the service started only when it receives `READY=1`, and shows
//! `STOPPING=1` while the drain runs. The server sends
//!
//! - `READY=1` once every shard accepts connections (the moment it prints
//!   `listening on ADDR shards=N`), so `systemctl start` / a rolling restart waits for a
//!   server that can really take clients;
//! - `STOPPING=1` when the first SIGTERM/SIGINT starts the drain.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op returning `Ok(false)`,
//! so callers never need to know how the process was started.
//!
//! `NotifyAccess=main` accepts messages from the main process only. The kernel reports
//! the sender's process id (its thread-group id) whichever thread sends, so any of the
//! process's threads (a shard, the signal thread) may call [`notify`].
//!
//! The protocol (`sd_notify(3)`): `$NOTIFY_SOCKET` is either an absolute path of an
//! `AF_UNIX` datagram socket, or an abstract socket name written with a leading `@`
//! (the `@` stands for the leading NUL byte of the abstract name). The state is a
//! newline-separated list of `KEY=VALUE` assignments, sent as one datagram.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `"READY=1"`, `"STOPPING=1"`, `"STATUS=draining"`) to the service
/// manager named by `$NOTIFY_SOCKET`.
///
/// Returns `Ok(false)` when `NOTIFY_SOCKET` is unset or empty (not started by systemd,
/// or not as `Type=notify`): nothing is sent and that is not an error. Returns
/// `Ok(true)` once the datagram was sent, and an error when the variable names an
/// address that is not supported or the send fails (a caller may log it at debug level
/// and carry on: the server works the same without systemd's bookkeeping).
///
/// The variable is left in the environment (unlike `sd_notify`'s `unset_environment`),
/// so that both `READY=1` and, later, `STOPPING=1` reach systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET_ENV) {
        Some(socket) if !socket.is_empty() => notify_socket(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket`, written as in `$NOTIFY_SOCKET`:
/// an absolute path (`/run/systemd/notify`) or an abstract name (`@name`).
///
/// This is [`notify`] without the environment lookup, for tests and for callers that
/// got the address elsewhere. Other address forms (relative paths, systemd's
/// `vsock:` addresses) are refused with [`io::ErrorKind::InvalidInput`].
pub fn notify_socket(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = match bytes.first() {
        Some(b'/') => sock.send_to(state.as_bytes(), socket)?,
        Some(b'@') => {
            let addr = abstract_addr(&bytes[1..])?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        _ => {
            let what = "is neither an absolute path nor an @abstract name";
            let message = format!("{NOTIFY_SOCKET_ENV}={socket:?} {what}");
            return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
        }
    };
    if sent != state.len() {
        let message = format!(
            "short notification datagram: {sent} of {} bytes",
            state.len()
        );
        return Err(io::Error::new(io::ErrorKind::WriteZero, message));
    }
    Ok(())
}

/// The socket address of an abstract `AF_UNIX` name (the bytes after the `@`).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

/// Abstract socket names exist on Linux only.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract notification sockets exist on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::time::Duration;

    /// Receives one datagram from `listener` as text (with a timeout, so a bug fails
    /// the test instead of hanging it).
    fn receive(listener: &UnixDatagram) -> String {
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_socket(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(receive(&listener), "READY=1");
        notify_socket(path.as_os_str(), "STOPPING=1\nSTATUS=draining").unwrap();
        assert_eq!(receive(&listener), "STOPPING=1\nSTATUS=draining");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("corelay-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_socket(&OsString::from(format!("@{name}")), "READY=1").unwrap();
        assert_eq!(receive(&listener), "READY=1");
    }

    #[test]
    fn refuses_other_address_forms() {
        for bad in ["relative/notify.sock", "vsock:2:1234"] {
            let err = notify_socket(OsStr::new(bad), "READY=1").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_listener_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        assert!(notify_socket(path.as_os_str(), "READY=1").is_err());
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        // The variable is process-wide; tests never set it (that would race with other
        // tests), so this checks the unset case only when the test runner has no socket.
        if std::env::var_os(NOTIFY_SOCKET_ENV).is_none_or(|s| s.is_empty()) {
            assert!(!notify("READY=1").unwrap());
        }
    }
}

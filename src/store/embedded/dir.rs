//! The data directory: corelay's own exclusive lock on it (taken before fjall's, so that a
//! second open fails at once with a clear error), and the errors of opening fjall there,
//! each naming the directory.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::history::StoreError;

/// Our own lock file in the data directory (fjall keeps its own `lock` too).
const LOCK_FILE: &str = "corelay.lock";

/// Our exclusive lock on the data directory, held by the writer thread until fjall is
/// closed. Taken before fjall's own, so a second open fails at once with a clear error.
pub(super) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(super) fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
                    StoreError::Open(format!("data dir {} is not writable: {e}", dir.display()))
                }
                _ => StoreError::Open(format!("cannot create {}: {e}", path.display())),
            })?;
        // flock, not std's `File::try_lock`, which needs a newer Rust than the crate's MSRV.
        // The lock belongs to this open file description: it is released when the file is
        // closed, also when the process dies, and a second open conflicts even in-process.
        // SAFETY: `file` is open for the whole call; flock only takes the descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == ErrorKind::WouldBlock {
                StoreError::InUse(dir.to_path_buf())
            } else {
                StoreError::Open(format!("cannot lock {}: {e}", path.display()))
            });
        }
        // The holder's pid, for whoever wonders who holds the directory.
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| {
                StoreError::Open(format!("data dir {} is not writable: {e}", dir.display()))
            })?;
        Ok(DirLock { _file: file })
    }
}

/// Maps an error from opening fjall to one that names the directory.
pub(super) fn open_error(dir: &Path, e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Locked => StoreError::InUse(dir.to_path_buf()),
        fjall::Error::Io(e) | fjall::Error::Storage(fjall::LsmError::Io(e)) => {
            if matches!(
                e.kind(),
                ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
            ) {
                StoreError::Open(format!("data dir {} is not writable: {e}", dir.display()))
            } else {
                StoreError::Open(format!("cannot open data dir {}: {e}", dir.display()))
            }
        }
        fjall::Error::InvalidVersion(v) => StoreError::Open(format!(
            "data dir {} holds data in an unsupported format ({v:?})",
            dir.display()
        )),
        fjall::Error::JournalRecovery(e) => StoreError::Corrupt(format!(
            "the journal in {} cannot be recovered: {e:?}",
            dir.display()
        )),
        e => StoreError::Open(format!("cannot open data dir {}: {e}", dir.display())),
    }
}

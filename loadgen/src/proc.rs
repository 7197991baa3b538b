//! Process figures from `/proc` (CPU time, resident set size) and the file-descriptor limit.

use anyhow::{bail, Context};
use std::time::Duration;

/// CPU time (all threads) of process `pid`: (user, system). The system part is the
/// kernel working for the process (on loopback that includes most of TCP for both ends).
pub fn cpu_times(pid: u32) -> anyhow::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| {
        format!("cannot read /proc/{pid}/stat (is --server-pid {pid} running?)")
    })?;
    let (user, system) =
        parse_cpu_ticks(&stat).with_context(|| format!("unexpected /proc/{pid}/stat format"))?;
    let secs = |ticks: u64| Duration::from_secs_f64(ticks as f64 / clock_ticks_per_sec());
    Ok((secs(user), secs(system)))
}

/// Total CPU time (user + system, all threads) of process `pid`.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    cpu_times(pid).map(|(user, system)| user + system)
}

/// (utime, stime), in clock ticks, from the text of `/proc/<pid>/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name (field 2) is in parentheses and may contain anything: split after
    // the last ')'. Fields 14 (utime) and 15 (stime) are then at indexes 11 and 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resident set size of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time and RSS summed over a set of processes (e.g. a server and its Redis).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Summed CPU time.
    pub cpu: Duration,
    /// The part of `cpu` spent in the processes' own code (the rest is the kernel's).
    pub user: Duration,
    /// Summed RSS in KiB.
    pub rss_kib: u64,
}

/// Samples every pid; `None` when `pids` is empty.
pub fn sample(pids: &[u32]) -> anyhow::Result<Option<Sample>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut s = Sample::default();
    for &pid in pids {
        let (user, system) = cpu_times(pid)?;
        s.cpu += user + system;
        s.user += user;
        s.rss_kib += rss_kib(pid)?;
    }
    Ok(Some(s))
}

/// Raises the soft `RLIMIT_NOFILE` as far as needed (up to the hard limit) for `need`
/// descriptors, or explains how to raise it. Returns the limit in force.
pub fn ensure_fd_limit(need: u64) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    if lim.rlim_cur >= need {
        return Ok(lim.rlim_cur);
    }
    if lim.rlim_max >= need {
        let want = libc::rlimit {
            rlim_cur: need.max(lim.rlim_cur),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return Ok(want.rlim_cur);
        }
    }
    bail!(
        "this run needs about {need} file descriptors but the limit is {} (hard {}): \
         raise it (e.g. `ulimit -n {need}` as root, or in limits.conf / systemd LimitNOFILE) \
         or use fewer connections; the server needs as many",
        lim.rlim_cur,
        lim.rlim_max
    )
}

/// Our own process id.
pub fn self_pid() -> u32 {
    std::process::id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some((150, 25)));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_status() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(parse_vm_rss(status), Some(2048));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn reads_self() {
        let me = self_pid();
        assert!(rss_kib(me).unwrap() > 0);
        cpu_time(me).unwrap();
        assert!(sample(&[]).unwrap().is_none());
        assert!(ensure_fd_limit(16).unwrap() >= 16);
        assert!(ensure_fd_limit(u64::MAX / 2).is_err());
    }
}

//! The systemd notification protocol (`sd_notify(3)`): `READY=1` once the
//! daemon serves, `WATCHDOG=1` while its loops answer, `STOPPING=1` at the end.
//!
//! It is one datagram to the socket in `$NOTIFY_SOCKET` (a path, or `@name`
//! in the abstract namespace); without that variable every call does nothing,
//! so the daemon runs the same outside systemd.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

/// Send `state` to the socket `target` names (`/path` or `@abstract`).
pub fn notify_to(target: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), Path::new(target))?;
    }
    Ok(())
}

/// Send `state` to systemd if it is listening; true if it was sent.
pub fn notify(state: &str) -> bool {
    match std::env::var("NOTIFY_SOCKET") {
        Ok(t) if !t.is_empty() => match notify_to(&t, state) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("sd_notify to {t}: {e}");
                false
            }
        },
        _ => false,
    }
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec`, when the watchdog is
/// on for this process.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let us: u64 = usec?.parse().ok().filter(|u| *u > 0)?;
    if let Some(p) = pid {
        if p.parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(us / 2))
}

/// [`watchdog_interval`] from this process's environment.
pub fn watchdog_from_env() -> Option<Duration> {
    watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        notify_to(p.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }

    #[test]
    fn systemd_watchdog_interval_is_half_and_for_this_pid_only() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }
}

//! Running as a service: systemd's readiness protocol (`sd_notify`) and the file-descriptor
//! limit. The only `unsafe` here is the two rlimit calls and the monotonic clock read, each
//! with its SAFETY comment.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` ("READY=1", "STOPPING=1", ...) to systemd over `$NOTIFY_SOCKET` (a unix datagram
/// socket; a leading `@` names an abstract one). `Ok(false)` when not run by systemd with
/// `Type=notify` (no `$NOTIFY_SOCKET`).
pub fn sd_notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd wants it with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and
    // CLOCK_MONOTONIC is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Descriptors the engine needs besides its connections: listener, epoll, wakers and timerfds
/// per reactor, the metrics endpoint, the snapshot file, stdio.
pub fn nofile_needed(max_connections: usize, reactors: usize) -> u64 {
    max_connections as u64 + 4 * reactors as u64 + 64
}

/// What [`raise_nofile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NofileOutcome {
    /// The soft limit already covered the need.
    Enough { soft: u64 },
    /// The soft limit was raised from `from` to `to`.
    Raised { from: u64, to: u64 },
    /// The hard limit is below the need: the soft limit is now the hard limit, `short` below it.
    Short { soft: u64, needed: u64, short: u64 },
}

/// Raises the soft `RLIMIT_NOFILE` to `needed`, up to the hard limit.
pub fn raise_nofile(needed: u64) -> io::Result<NofileOutcome> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is u64 on Linux.
    let (soft, hard): (u64, u64) = (lim.rlim_cur, lim.rlim_max);
    if soft >= needed {
        return Ok(NofileOutcome::Enough { soft });
    }
    let target = needed.min(hard);
    if target > soft {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit read by the call; the hard limit is unchanged and
        // the soft one not above it, which an unprivileged process may set.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if target < needed {
        return Ok(NofileOutcome::Short {
            soft: target.max(soft),
            needed,
            short: needed - target.max(soft),
        });
    }
    Ok(NofileOutcome::Raised {
        from: soft,
        to: target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_notify_sends_one_datagram_to_notify_socket() {
        let dir = std::env::temp_dir().join(format!("lanpush-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        // SAFETY of the test: no other test reads or writes NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(sd_notify("READY=1").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!sd_notify("READY=1").unwrap(), "no socket: nothing sent");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_soft_nofile_limit_is_raised_within_the_hard_one() {
        // Asking for what we have is always enough; asking for more than any hard limit says
        // by how much it falls short.
        let soft = match raise_nofile(1).unwrap() {
            NofileOutcome::Enough { soft } => soft,
            other => panic!("{other:?}"),
        };
        assert!(soft >= 1);
        match raise_nofile(u64::MAX / 2).unwrap() {
            NofileOutcome::Short { needed, short, .. } => {
                assert_eq!(needed, u64::MAX / 2);
                assert!(short > 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(nofile_needed(10_000, 4) > 10_000);
        assert!(monotonic_usec() > 0);
    }
}

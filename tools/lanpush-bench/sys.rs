//! The few syscalls std does not wrap: level-triggered epoll for the subscriber threads, a
//! one-descriptor `poll(2)`, the timer slack of the publisher threads, the open-file limit and
//! the SIGINT that stops the tool's `perf` child.
//! This is the only module of the tool with `unsafe`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A level-triggered epoll set: a descriptor stays reported for as long as it has unread bytes,
/// so a reader that stops early (bounded work per turn) is woken again. That is why this is not
/// mio, whose registrations are edge-triggered and would oblige every driver to drain its socket
/// until `WouldBlock`.
pub struct Epoll {
    fd: OwnedFd,
}

/// Room for the events of one `epoll_wait`.
pub struct Events {
    buf: Vec<libc::epoll_event>,
}

impl Events {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity.max(1)),
        }
    }

    /// Tokens of the descriptors reported by the last [`Epoll::wait`].
    pub fn tokens(&self) -> impl Iterator<Item = u64> + '_ {
        // By value: `epoll_event` is packed on x86_64, so no reference to its field.
        self.buf.iter().map(|event| event.u64)
    }
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for readability (and hang-up), level-triggered, reported as `token`.
    /// The caller keeps `fd` open until it is deleted or this set is dropped.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event that outlives the call.
        let rc =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add`; the kernel ignores the event for EPOLL_CTL_DEL.
        let rc =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (0: do not wait) and fills `events`; an interrupted wait reports
    /// nothing rather than an error.
    pub fn wait(&self, events: &mut Events, timeout_ms: i32) -> io::Result<usize> {
        events.buf.clear();
        let capacity = events.buf.capacity().min(i32::MAX as usize) as i32;
        // SAFETY: the pointer and capacity describe the Vec's (empty) allocation; the kernel writes
        // at most `capacity` entries and reports how many, which is the length we then set.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.buf.as_mut_ptr(),
                capacity,
                timeout_ms,
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(error)
            };
        }
        // SAFETY: epoll_wait initialised the first `n` (<= capacity) entries.
        unsafe { events.buf.set_len(n as usize) };
        Ok(n as usize)
    }
}

/// Waits until `fd` is readable (or hung up) or `timeout` passed; `Ok(true)` if readable.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    if n < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(error)
        };
    }
    Ok(n > 0)
}

/// Sends SIGINT to `pid` (a child of this tool: `perf stat`, which then prints its counts).
pub fn interrupt(pid: u32) {
    // SAFETY: kill takes two integers and no pointers.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
}

/// Makes `thread::sleep` on the calling thread wake within microseconds of its deadline instead
/// of the default 50 µs timer slack, so a publisher can sleep most of the way to a send time and
/// spin only for the last few microseconds. Best effort: failure only costs precision.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Raises the soft open-file limit to the hard one (1,000 subscribers need more than the usual
/// 1,024 descriptors once publishers, epoll sets and the engine's inherited limit are counted).
/// Returns the soft limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit the kernel fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit read just above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// CPU time (user + system) this process has used so far, in ns.
pub fn process_cpu_ns() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage the kernel fills in.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } < 0 {
        return 0;
    }
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1_000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

/// CPU time (user + system) process `pid` has used so far, in ns, from `/proc/<pid>/stat`.
pub fn other_process_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, so split after its closing paren):
    // state is field 3 of the man page, utime 14 and stime 15.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf takes an integer name and no pointers.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_s <= 0 {
        return None;
    }
    Some((utime + stime) * 1_000_000_000 / ticks_per_s as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_this_process_is_seen_both_ways() {
        let start = process_cpu_ns();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_ns() > start);
        assert!(other_process_cpu_ns(std::process::id()).is_some());
    }

    #[test]
    fn epoll_reports_a_readable_socket_until_it_is_drained() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        let epoll = Epoll::new().unwrap();
        epoll.add(b.as_raw_fd(), 7).unwrap();
        let mut events = Events::with_capacity(4);
        assert_eq!(epoll.wait(&mut events, 0).unwrap(), 0);
        a.write_all(b"hello").unwrap();
        assert_eq!(epoll.wait(&mut events, 1_000).unwrap(), 1);
        assert_eq!(events.tokens().collect::<Vec<_>>(), [7]);
        // Level-triggered: still reported while unread.
        assert_eq!(epoll.wait(&mut events, 0).unwrap(), 1);
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf).unwrap(), 5);
        assert_eq!(epoll.wait(&mut events, 0).unwrap(), 0);
        assert!(!wait_readable(b.as_raw_fd(), Duration::from_millis(1)).unwrap());
        epoll.delete(b.as_raw_fd()).unwrap();
    }
}

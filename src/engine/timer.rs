//! A one-shot microsecond timer a reactor can poll: a Linux `timerfd` registered with mio.
//!
//! `mio::Poll` rounds its timeout up to whole milliseconds (epoll_wait's unit), which is too
//! coarse for the write-coalescing deadline (`delivery.max_write_interval_us`, a few hundred
//! microseconds). The timerfd fires at the deadline itself and wakes the poll like any socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

pub(crate) struct DeadlineTimer {
    fd: OwnedFd,
    /// The deadline the kernel timer is set for, until it has fired and been drained.
    armed: Option<Instant>,
}

impl DeadlineTimer {
    pub(crate) fn new() -> io::Result<DeadlineTimer> {
        // SAFETY: plain syscall; the returned descriptor is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DeadlineTimer {
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: None,
        })
    }

    /// Makes the timer fire at `at` unless it is already set to fire no later.
    pub(crate) fn arm(&mut self, at: Instant, now: Instant) -> io::Result<()> {
        if self.armed.is_some_and(|armed| armed <= at) {
            return Ok(());
        }
        // A zero it_value would disarm the timer: fire after one nanosecond instead.
        let after = at
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid descriptor and a fully initialised itimerspec; old value not wanted.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = Some(at);
        Ok(())
    }

    /// Call when the poll reports the timer readable: consumes the expiry.
    pub(crate) fn fired(&mut self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live 8-byte buffer. WouldBlock (a spurious
        // report) is fine to ignore.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
        self.armed = None;
    }
}

impl Source for DeadlineTimer {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.fd.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        SourceFd(&self.fd.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        SourceFd(&self.fd.as_raw_fd()).deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};

    #[test]
    fn fires_once_at_its_deadline_and_keeps_the_earliest() {
        let mut poll = Poll::new().unwrap();
        let mut timer = DeadlineTimer::new().unwrap();
        poll.registry()
            .register(&mut timer, Token(7), Interest::READABLE)
            .unwrap();
        let now = Instant::now();
        timer.arm(now + Duration::from_millis(2), now).unwrap();
        // A later deadline does not push the armed one back.
        timer.arm(now + Duration::from_secs(60), now).unwrap();
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(10)))
            .unwrap();
        let tokens: Vec<Token> = events.iter().map(|e| e.token()).collect();
        assert_eq!(tokens, vec![Token(7)]);
        assert!(now.elapsed() >= Duration::from_millis(2));
        timer.fired();
        // Drained: no further report until re-armed.
        poll.poll(&mut events, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(events.is_empty());
    }
}

//! Subscriber threads: each owns a set of subscriber connections and one level-triggered epoll
//! set, so 1,000 subscribers run on as many threads as there are cores.
//!
//! A connection is polled (`SubConn::poll` with a zero timeout) when epoll reports its socket
//! readable. Level-triggered, so a driver that stops reading early (bounded work per call) is
//! reported again on the next turn while bytes remain; no extra `read` that would only return
//! `WouldBlock` is spent per arrival. Every connection is also polled every
//! [`HOUSEKEEPING_INTERVAL`], for heartbeats and for anything a driver buffered while
//! subscribing. Drivers that expose no descriptor are polled round-robin, and the thread naps
//! briefly when a whole round brought nothing.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::driver::SubConn;
use crate::recorder::{Class, Recorder};
use crate::runner::Progress;
use crate::sys::{Epoll, Events};

/// How long one epoll wait blocks before the thread checks `stop` again.
const WAIT_TIMEOUT_MS: i32 = 50;
/// How often every connection is polled whether or not it is readable, so drivers can answer
/// heartbeats and notice a dead socket.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);
/// Nap of a thread that has descriptor-less connections and found nothing in a whole round.
const FD_LESS_NAP: Duration = Duration::from_micros(100);

/// Per-connection counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotCounts {
    /// Messages intended in the measured window.
    pub measured: u64,
    /// Messages intended during warm-up.
    pub warmup: u64,
    /// Messages ignored: intended before this run, or too short to carry a timestamp.
    pub stale: u64,
}

/// One subscriber connection.
pub struct SubSlot {
    pub client_id: String,
    pub pattern: String,
    pub conn: Box<dyn SubConn>,
    pub counts: SlotCounts,
    /// The error that ended this connection, if any.
    pub failed: Option<String>,
    fd: Option<RawFd>,
    registered: bool,
}

impl SubSlot {
    pub fn new(client_id: String, pattern: String, conn: Box<dyn SubConn>) -> Self {
        let fd = conn.raw_fd();
        Self {
            client_id,
            pattern,
            conn,
            counts: SlotCounts::default(),
            failed: None,
            fd,
            registered: false,
        }
    }

    /// Polls once without waiting; returns how many messages it delivered. A connection that
    /// fails leaves the epoll set at once, or its hang-up would be reported on every wait.
    fn poll_once<C: Clock>(&mut self, clock: &C, recorder: &mut Recorder, epoll: &Epoll) -> usize {
        let n = self.poll_conn(clock, recorder);
        if self.failed.is_some() && self.registered {
            if let Some(fd) = self.fd {
                // The socket may already be closed (and so out of the set): nothing to undo then.
                let _ = epoll.delete(fd);
            }
            self.registered = false;
        }
        n
    }

    fn poll_conn<C: Clock>(&mut self, clock: &C, recorder: &mut Recorder) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        let counts = &mut self.counts;
        let mut on_message =
            |_topic: &str, payload: &[u8]| match recorder.handle_message(clock.now_ns(), payload) {
                Class::Measured => counts.measured += 1,
                Class::Warmup => counts.warmup += 1,
                Class::Stale => counts.stale += 1,
            };
        match self.conn.poll(Duration::ZERO, &mut on_message) {
            Ok(n) => n,
            Err(error) => {
                self.failed = Some(format!("subscriber {}: {error}", self.client_id));
                0
            }
        }
    }
}

/// Polls `slots` until `stop` is set, recording into `recorder`. Connection failures are kept in
/// the slot and do not stop the others; only an epoll failure ends the thread early.
pub fn run_subscriber_thread<C: Clock>(
    clock: &C,
    slots: &mut [SubSlot],
    recorder: &mut Recorder,
    stop: &AtomicBool,
    progress: &Progress,
) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    let mut fd_less = Vec::new();
    for (index, slot) in slots.iter_mut().enumerate() {
        match slot.fd {
            Some(fd) => {
                epoll.add(fd, index as u64)?;
                slot.registered = true;
            }
            None => fd_less.push(index),
        }
    }
    let mut events = Events::with_capacity(slots.len().clamp(1, 1024));
    // Let the first turn poll everything: drivers may hold messages read while subscribing.
    let mut last_housekeeping = Instant::now() - HOUSEKEEPING_INTERVAL;

    while !stop.load(Ordering::Relaxed) {
        let timeout_ms = if fd_less.is_empty() {
            WAIT_TIMEOUT_MS
        } else {
            0
        };
        epoll.wait(&mut events, timeout_ms)?;
        let mut delivered = 0u64;
        for token in events.tokens() {
            delivered += slots[token as usize].poll_once(clock, recorder, &epoll) as u64;
        }
        if !fd_less.is_empty() {
            let mut fd_less_delivered = 0;
            for &index in &fd_less {
                fd_less_delivered += slots[index].poll_once(clock, recorder, &epoll);
            }
            if fd_less_delivered == 0 && delivered == 0 {
                std::thread::sleep(FD_LESS_NAP);
            }
            delivered += fd_less_delivered as u64;
        }
        if last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
            last_housekeeping = Instant::now();
            for slot in slots.iter_mut() {
                delivered += slot.poll_once(clock, recorder, &epoll) as u64;
            }
        }
        if delivered > 0 {
            progress.add_delivered(delivered, recorder);
        }
    }
    progress.add_delivered(0, recorder);
    Ok(())
}

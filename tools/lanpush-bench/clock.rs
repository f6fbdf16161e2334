//! Time as the measurement sees it. The publisher and subscriber loops take a [`Clock`] so the
//! tests can drive the very same code on a [`VirtualClock`].

use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Below this distance to a deadline the wall clock spins (yielding the core) instead of sleeping:
/// with the timer slack tightened (see `sys::tighten_timer_slack`) a sleep overshoots by a few
/// microseconds, so 50 µs of spinning absorbs it.
const SPIN_BELOW_NS: u64 = 50_000;

/// A source of "now", in ns since the UNIX epoch, and a way to wait for a deadline.
pub trait Clock: Sync {
    fn now_ns(&self) -> u64;
    /// Returns at or after `deadline_ns` (immediately if it has passed).
    fn sleep_until(&self, deadline_ns: u64);
}

/// The real clock: UNIX-epoch nanoseconds read once from `SystemTime` at start, advanced by the
/// monotonic clock. Timestamps written into payloads are thus on the epoch scale the driver
/// contract asks for, but an NTP step during a run cannot produce negative or jumping latencies.
/// Every thread of a run must share one `WallClock` (it is `Copy`).
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    anchor: Instant,
    anchor_epoch_ns: u64,
}

impl WallClock {
    pub fn new() -> Self {
        let anchor = Instant::now();
        let anchor_epoch_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            anchor,
            anchor_epoch_ns,
        }
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for WallClock {
    fn now_ns(&self) -> u64 {
        self.anchor_epoch_ns + self.anchor.elapsed().as_nanos() as u64
    }

    fn sleep_until(&self, deadline_ns: u64) {
        loop {
            let now = self.now_ns();
            if now >= deadline_ns {
                return;
            }
            let left = deadline_ns - now;
            if left > SPIN_BELOW_NS {
                thread::sleep(Duration::from_nanos(left - SPIN_BELOW_NS));
            } else {
                // The broker shares these cores: give them away while spinning.
                thread::yield_now();
            }
        }
    }
}

/// A clock that only moves when told to: `sleep_until` jumps to the deadline, and a simulated
/// system under test calls [`VirtualClock::advance`] to model time it takes.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct VirtualClock {
    now_ns: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl VirtualClock {
    pub fn starting_at(now_ns: u64) -> Self {
        Self {
            now_ns: std::sync::atomic::AtomicU64::new(now_ns),
        }
    }

    pub fn advance(&self, by_ns: u64) {
        self.now_ns
            .fetch_add(by_ns, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for VirtualClock {
    fn now_ns(&self) -> u64 {
        self.now_ns.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn sleep_until(&self, deadline_ns: u64) {
        self.now_ns
            .fetch_max(deadline_ns, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_is_epoch_scaled_and_monotonic() {
        let clock = WallClock::new();
        let a = clock.now_ns();
        // 2020-01-01 in ns: any sane machine is past it.
        assert!(a > 1_577_836_800_000_000_000);
        let deadline = a + 2_000_000;
        clock.sleep_until(deadline);
        assert!(clock.now_ns() >= deadline);
    }

    #[test]
    fn virtual_clock_jumps_to_deadlines() {
        let clock = VirtualClock::starting_at(100);
        clock.sleep_until(50);
        assert_eq!(clock.now_ns(), 100);
        clock.sleep_until(1_000);
        assert_eq!(clock.now_ns(), 1_000);
        clock.advance(5);
        assert_eq!(clock.now_ns(), 1_005);
    }
}

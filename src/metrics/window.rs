//! Windowed maxima for `/metrics` (`lanpush_*_max_seconds`): the highest latency of the
//! current fixed [`WINDOW_NS`] (10 s) window of wall-clock time and of the one before it, so
//! a scrape reports the worst of the last 10 to 20 seconds and a spike ages out instead of
//! staying the maximum forever. Scrape at least every 10 s to see every spike.
//!
//! A plain value fed `now_ns` (the wall clock the write path reads anyway): recording costs a
//! comparison and a max, rolling over once per window.

/// Length of one window, nanoseconds of wall-clock time; windows start at multiples of it.
pub const WINDOW_NS: u64 = 10_000_000_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowMax {
    /// Start of the current window (a multiple of [`WINDOW_NS`]); 0 before the first value.
    start_ns: u64,
    /// Highest value recorded in it, and in the window just before it.
    max_us: u64,
    prev_max_us: u64,
}

impl WindowMax {
    #[inline]
    pub fn record(&mut self, now_ns: u64, us: u64) {
        if now_ns >= self.start_ns.saturating_add(WINDOW_NS) {
            self.roll(now_ns);
        }
        self.max_us = self.max_us.max(us);
    }

    #[cold]
    fn roll(&mut self, now_ns: u64) {
        let start = now_ns - now_ns % WINDOW_NS;
        self.prev_max_us = if start == self.start_ns.saturating_add(WINDOW_NS) {
            self.max_us
        } else {
            0
        };
        self.start_ns = start;
        self.max_us = 0;
    }

    /// The highest value of the window holding `now_ns` and the one before it (0 if none).
    pub fn max_at(&self, now_ns: u64) -> u64 {
        let start = now_ns - now_ns % WINDOW_NS;
        if start == self.start_ns {
            self.max_us.max(self.prev_max_us)
        } else if start == self.start_ns.saturating_add(WINDOW_NS) {
            self.max_us
        } else {
            0
        }
    }

    /// Combines another shard's record: windows are aligned to the later of the two.
    pub fn merge(&mut self, other: &WindowMax) {
        let (mut a, mut b) = (*self, *other);
        if a.start_ns < b.start_ns {
            std::mem::swap(&mut a, &mut b);
        }
        // `a` is at the later window (or the same); bring `b` forward to it.
        let (b_max, b_prev) = if b.start_ns == a.start_ns {
            (b.max_us, b.prev_max_us)
        } else if b.start_ns.saturating_add(WINDOW_NS) == a.start_ns {
            (0, b.max_us)
        } else {
            (0, 0)
        };
        *self = WindowMax {
            start_ns: a.start_ns,
            max_us: a.max_us.max(b_max),
            prev_max_us: a.prev_max_us.max(b_prev),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000 * 1_000_000_000; // a window boundary

    #[test]
    fn a_spike_ages_out_after_two_windows() {
        let mut w = WindowMax::default();
        assert_eq!(w.max_at(T), 0);
        w.record(T + 1, 900);
        w.record(T + 2, 10);
        assert_eq!(w.max_at(T + 5), 900);
        // Next window: the spike is the previous window's, still reported.
        w.record(T + WINDOW_NS + 1, 20);
        assert_eq!(w.max_at(T + WINDOW_NS + 2), 900);
        // Without records, reading alone ages it too.
        assert_eq!(w.max_at(T + 2 * WINDOW_NS + 1), 20);
        assert_eq!(w.max_at(T + 3 * WINDOW_NS), 0);
        // A record after a silence of several windows does not bring old values back.
        w.record(T + 5 * WINDOW_NS, 7);
        assert_eq!(w.max_at(T + 5 * WINDOW_NS), 7);
    }

    #[test]
    fn shards_merge_by_window() {
        let (mut a, mut b, mut c) = Default::default();
        WindowMax::record(&mut a, T + 1, 50);
        WindowMax::record(&mut b, T + WINDOW_NS + 1, 30);
        WindowMax::record(&mut c, T - 3 * WINDOW_NS, 999);
        let mut m = a;
        m.merge(&b);
        m.merge(&c);
        assert_eq!(
            m.max_at(T + WINDOW_NS + 2),
            50,
            "a's window is the previous one"
        );
        assert_eq!(m.max_at(T + 2 * WINDOW_NS), 30);
        let mut m2 = c;
        m2.merge(&b);
        m2.merge(&a);
        assert_eq!(m, m2, "order does not matter");
    }
}

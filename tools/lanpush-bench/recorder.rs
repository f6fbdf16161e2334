//! The latency measurement: payload timestamps and the per-thread histogram.
//!
//! Every payload starts with the time its publisher *intended* to send it (8 bytes, LE ns since
//! the UNIX epoch), never the time it actually did. Latency is `arrival - intended`, so a stall
//! anywhere (broker, network, the publisher itself) counts against every message scheduled
//! during it: the measurement is free of coordinated omission.

use hdrhistogram::Histogram;

/// Bytes at the start of every payload that hold the intended send time.
pub const TIMESTAMP_BYTES: usize = 8;
/// Largest latency the histograms hold; larger values are recorded as this.
pub const LATENCY_HIGH_NS: u64 = 60_000_000_000;
/// Significant decimal digits of every histogram (relative error below 0.1%).
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// An empty latency histogram in nanoseconds, 1 ns .. 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (1 <= low, high >= 2 * low, sigfig <= 5): creation cannot fail.
    Histogram::new_with_bounds(1, LATENCY_HIGH_NS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Writes the intended send time into the first 8 bytes of `payload` (which has at least 8).
pub fn write_intended(payload: &mut [u8], intended_ns: u64) {
    payload[..TIMESTAMP_BYTES].copy_from_slice(&intended_ns.to_le_bytes());
}

/// The intended send time carried by `payload`, if it is long enough.
pub fn intended_ns(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; TIMESTAMP_BYTES] = payload.get(..TIMESTAMP_BYTES)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Instants that split a run: messages intended before `run_start_ns` are not ours (a retained
/// value from an earlier run, a stray publisher) and are ignored; those intended before
/// `measure_start_ns` are warm-up; the rest are measured. `end_ns` closes the measured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub run_start_ns: u64,
    pub measure_start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    pub fn measured_seconds(&self) -> f64 {
        (self.end_ns - self.measure_start_ns) as f64 / 1e9
    }
}

/// How a received message was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Too short, or intended before the run started: ignored.
    Stale,
    /// Intended during warm-up: counted, not in the histogram.
    Warmup,
    /// Intended in the measured window: counted and recorded.
    Measured,
}

/// One subscriber thread's measurement. Owned by that thread (no sharing on the hot path);
/// histograms are merged when the run ends.
pub struct Recorder {
    pub window: Window,
    pub histogram: Histogram<u64>,
    /// Messages (any but stale) that arrived inside the measured window, by arrival time: the
    /// numerator of the delivered-throughput figure.
    pub arrived_in_window: u64,
    /// Largest latency recorded since the progress line last took it.
    pub recent_max_ns: u64,
    /// Measured messages already added to the shared progress counters.
    pub measured_reported: u64,
}

impl Recorder {
    pub fn new(window: Window) -> Self {
        Self {
            window,
            histogram: new_histogram(),
            arrived_in_window: 0,
            recent_max_ns: 0,
            measured_reported: 0,
        }
    }

    /// Accounts for one message that arrived at `now_ns`.
    #[inline]
    pub fn handle_message(&mut self, now_ns: u64, payload: &[u8]) -> Class {
        let Some(intended) = intended_ns(payload) else {
            return Class::Stale;
        };
        if intended < self.window.run_start_ns || intended >= self.window.end_ns {
            return Class::Stale;
        }
        if now_ns >= self.window.measure_start_ns && now_ns < self.window.end_ns {
            self.arrived_in_window += 1;
        }
        if intended < self.window.measure_start_ns {
            return Class::Warmup;
        }
        // A message cannot arrive before it was meant to be sent on one clock; clamp anyway.
        let latency = now_ns.saturating_sub(intended).min(LATENCY_HIGH_NS);
        self.histogram.saturating_record(latency);
        self.recent_max_ns = self.recent_max_ns.max(latency);
        Class::Measured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        Window {
            run_start_ns: 1_000,
            measure_start_ns: 2_000,
            end_ns: 1_000_000_000_000,
        }
    }

    fn payload(intended: u64) -> [u8; 16] {
        let mut p = [0xAB; 16];
        write_intended(&mut p, intended);
        p
    }

    #[test]
    fn classifies_by_intended_time() {
        let mut r = Recorder::new(window());
        assert_eq!(r.handle_message(5_000, &payload(500)), Class::Stale);
        assert_eq!(r.handle_message(5_000, &[1, 2, 3]), Class::Stale);
        assert_eq!(r.handle_message(5_000, &payload(1_500)), Class::Warmup);
        assert_eq!(r.handle_message(5_000, &payload(2_500)), Class::Measured);
        assert_eq!(r.histogram.len(), 1);
        assert!(r.histogram.equivalent(r.histogram.max(), 2_500));
        assert_eq!(r.arrived_in_window, 2);
    }

    /// Recorded latencies uniform on 1..=1000 µs come out at the textbook percentiles, to within
    /// the histogram's 3 significant digits.
    #[test]
    fn uniform_synthetic_delays_give_known_percentiles() {
        let mut r = Recorder::new(window());
        let intended = 10_000_000;
        for us in 1..=1000u64 {
            r.handle_message(intended + us * 1_000, &payload(intended));
        }
        let h = &r.histogram;
        assert_eq!(h.len(), 1000);
        for (quantile, expected_us) in [
            (0.5, 500.0),
            (0.9, 900.0),
            (0.99, 990.0),
            (0.999, 999.0),
            (1.0, 1000.0),
        ] {
            let got_us = h.value_at_quantile(quantile) as f64 / 1_000.0;
            let error = (got_us - expected_us).abs() / expected_us;
            assert!(
                error <= 0.001,
                "q{quantile}: got {got_us} µs, expected {expected_us} µs"
            );
        }
        let mean_us = h.mean() / 1_000.0;
        assert!((mean_us - 500.5).abs() / 500.5 < 0.001, "mean {mean_us}");
    }

    /// A known mix: 99% of messages at 100 µs and 1% at 50 ms. p50..p98 sit on the fast mode,
    /// p99.5 and above on the slow one.
    #[test]
    fn bimodal_mix_splits_at_the_right_percentile() {
        let mut r = Recorder::new(window());
        let intended = 10_000_000;
        for i in 0..10_000u64 {
            let latency = if i % 100 == 0 { 50_000_000 } else { 100_000 };
            r.handle_message(intended + latency, &payload(intended));
        }
        let h = &r.histogram;
        let near = |value: u64, target: u64| {
            (value as f64 - target as f64).abs() / (target as f64) < 0.001
        };
        assert!(near(h.value_at_quantile(0.5), 100_000));
        assert!(near(h.value_at_quantile(0.98), 100_000));
        assert!(near(h.value_at_quantile(0.995), 50_000_000));
        assert!(near(h.max(), 50_000_000));
    }
}

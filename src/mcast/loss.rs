//! The seeded loss injector (Aeron's tests do the same: this kernel has no netem). Enabled by
//! `multicast.test_loss` on the engine's send path, so every receiver loses the same datagrams;
//! the tests also put one on each simulated receiver.

/// Drops datagrams at random: bursts of `burst` consecutive datagrams, started with a
/// probability chosen so that `percent` of all datagrams are dropped in the long run.
#[derive(Debug, Clone)]
pub struct LossGen {
    state: u64,
    /// Probability of starting a burst, in 1/2^32 units.
    start_threshold: u64,
    burst: u32,
    left_in_burst: u32,
}

impl LossGen {
    /// `percent` in 0 ..= 100, `burst` at least 1.
    pub fn new(seed: u64, percent: f64, burst: u32) -> LossGen {
        let burst = burst.max(1);
        let p = (percent.clamp(0.0, 100.0) / 100.0) / f64::from(burst);
        LossGen {
            // xorshift needs a non-zero state.
            state: seed ^ 0x9E37_79B9_7F4A_7C15 | 1,
            start_threshold: (p * 4_294_967_296.0) as u64,
            burst,
            left_in_burst: 0,
        }
    }

    fn next_u32(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x >> 32
    }

    /// Whether the next datagram is lost.
    pub fn drop_next(&mut self) -> bool {
        if self.left_in_burst > 0 {
            self.left_in_burst -= 1;
            return true;
        }
        if self.next_u32() < self.start_threshold {
            self.left_in_burst = self.burst - 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::LossGen;

    /// tests/multicast.rs relies on this seed: its first burst of 50 starts at the second
    /// datagram, so the test needs only 51 datagrams to see the whole burst.
    #[test]
    fn seed_4102_drops_datagrams_2_to_51_first() {
        let mut gen = LossGen::new(4102, 20.0, 50);
        let dropped: Vec<usize> = (1..=60).filter(|_| gen.drop_next()).collect();
        assert_eq!(dropped, (2..=51).collect::<Vec<_>>());
    }
}

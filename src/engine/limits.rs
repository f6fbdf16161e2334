//! Limits on what one client, or one source address, can make the engine do, as plain values
//! that take `now` (no clock, no socket): a token bucket for rates, and the count of
//! connections per source address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::HashMap;

/// A token bucket: `rate_per_s` tokens a second, at most `burst` saved up. Integer arithmetic
/// in nanoseconds of credit, so it neither drifts nor needs floating point.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Nanoseconds of refill that make one token.
    ns_per_token: u64,
    /// Credit, in nanoseconds of refill, capped at `burst` tokens' worth.
    credit_ns: u64,
    max_credit_ns: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`. A rate of 0 is treated as 1 a second.
    pub fn new(rate_per_s: u64, burst: u64, now: Instant) -> TokenBucket {
        let ns_per_token = 1_000_000_000 / rate_per_s.clamp(1, 1_000_000_000);
        let max_credit_ns = ns_per_token.saturating_mul(burst.max(1));
        TokenBucket {
            ns_per_token,
            credit_ns: max_credit_ns,
            max_credit_ns,
            last: now,
        }
    }

    /// Takes one token if there is one at `now`. A `now` earlier than the last one adds nothing.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let refill = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.credit_ns = self
            .credit_ns
            .saturating_add(refill)
            .min(self.max_credit_ns);
        if self.credit_ns >= self.ns_per_token {
            self.credit_ns -= self.ns_per_token;
            true
        } else {
            false
        }
    }

    /// How long until a token is there, from the last `now` seen.
    pub fn wait(&self) -> Duration {
        Duration::from_nanos(self.ns_per_token.saturating_sub(self.credit_ns))
    }
}

/// Connections open per source address (`limits.max_connections_per_address`; 0 = no limit).
/// The acceptor admits, whoever drops the connection releases. Entries at zero are removed, so
/// it holds one entry per address with a connection open.
#[derive(Debug, Default)]
pub(crate) struct SourceLimits {
    max_per_address: usize,
    open: HashMap<IpAddr, usize>,
}

impl SourceLimits {
    pub(crate) fn new(max_per_address: usize) -> SourceLimits {
        SourceLimits {
            max_per_address,
            open: HashMap::default(),
        }
    }

    /// Counts a new connection from `addr`, unless the address is at its limit (`false`).
    pub(crate) fn try_admit(&mut self, addr: IpAddr) -> bool {
        if self.max_per_address == 0 {
            return true;
        }
        let n = self.open.entry(addr).or_insert(0);
        if *n >= self.max_per_address {
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `addr` that was admitted is gone.
    pub(crate) fn release(&mut self, addr: IpAddr) {
        if let Some(n) = self.open.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&addr);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn addresses(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..20).filter(|_| b.try_take(t0)).count(), 5, "the burst");
        assert!(!b.try_take(t0 + Duration::from_millis(99)));
        assert!(
            b.try_take(t0 + Duration::from_millis(100)),
            "one per 100 ms"
        );
        assert_eq!(b.wait(), Duration::from_millis(100));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.try_take(later)).count(), 5);
        // Time going backwards gives nothing.
        assert!(!b.try_take(t0));
    }

    #[test]
    fn source_limits_count_per_address_and_forget_closed_ones() {
        let mut s = SourceLimits::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(s.try_admit(a) && s.try_admit(a));
        assert!(!s.try_admit(a), "third from a");
        assert!(s.try_admit(b), "b has its own count");
        s.release(a);
        assert!(s.try_admit(a));
        s.release(a);
        s.release(a);
        s.release(b);
        assert_eq!(s.addresses(), 0);
        let mut off = SourceLimits::new(0);
        assert!((0..1000).all(|_| off.try_admit(a)));
        assert_eq!(off.addresses(), 0, "no limit holds nothing");
    }
}

//! [`Buckets`]: the recording side of an HdrHistogram, cut down to an index and an increment.
//!
//! `hdrhistogram::Histogram::record` also tracks min, max and the total count, checks for
//! resizing and is not inlined: about 8 ns per value here, three values per frame written.
//! [`Buckets`] keeps only the counts, in exactly the HdrHistogram layout for the same
//! significant digits (lowest value 1), so a snapshot turns them into a `Histogram` losslessly
//! ([`Buckets::add_to`]) and min, max and total are derived then.

use hdrhistogram::Histogram;

use super::snapshot::{LatencySummary, QUANTILES};

/// A bucket counter: `u64` for totals and prefixes, `u32` (half the memory) per connection.
/// `u32` increments saturate, as the histogram's own do.
pub(crate) trait Count: Copy + Default {
    fn increment(&mut self);
    fn as_u64(self) -> u64;
}

impl Count for u64 {
    #[inline(always)]
    fn increment(&mut self) {
        // 2^64 increments take centuries at any rate the engine reaches: no check needed.
        *self = self.wrapping_add(1);
    }
    fn as_u64(self) -> u64 {
        self
    }
}

impl Count for u32 {
    #[inline(always)]
    fn increment(&mut self) {
        *self = self.saturating_add(1);
    }
    fn as_u64(self) -> u64 {
        u64::from(self)
    }
}

/// Counts of values `0 ..= max` in HdrHistogram's log-linear buckets for `SIGFIG`
/// significant digits (1 ..= 5). The layout is a compile-time constant, so the index
/// computation is a handful of instructions on immediates.
#[derive(Debug, Clone)]
pub(crate) struct Buckets<C, const SIGFIG: u8> {
    counts: Box<[C]>,
    max: u64,
}

impl<C: Count, const SIGFIG: u8> Buckets<C, SIGFIG> {
    /// ceil(log2(2 * 10^SIGFIG)): the sub-bucket count's magnitude, as HdrHistogram sizes it.
    const MAGNITUDE: u32 = {
        assert!(SIGFIG >= 1 && SIGFIG <= 5);
        let single_unit_max = 2 * 10u64.pow(SIGFIG as u32);
        64 - (single_unit_max - 1).leading_zeros()
    };
    /// log2 of half the sub-bucket count.
    const HALF_MAGNITUDE: u32 = Self::MAGNITUDE - 1;
    /// Values up to this fall in bucket 0.
    const SUB_BUCKET_MASK: u64 = (1u64 << Self::MAGNITUDE) - 1;
    const LEADING_ZERO_BASE: u32 = 64 - Self::MAGNITUDE;

    /// Buckets for values up to `max` (larger ones are counted as `max`).
    pub(crate) fn new(max: u64) -> Self {
        let max = max.max(1);
        Buckets {
            counts: vec![C::default(); Self::index(max) + 1].into_boxed_slice(),
            max,
        }
    }

    #[inline(always)]
    fn index(value: u64) -> usize {
        let bucket = Self::LEADING_ZERO_BASE - (value | Self::SUB_BUCKET_MASK).leading_zeros();
        ((u64::from(bucket) << Self::HALF_MAGNITUDE) + (value >> bucket)) as usize
    }

    /// The lowest value of bucket `index`, and the bucket's width.
    fn range_of(&self, index: usize) -> (u64, u64) {
        let index = index as u64;
        if index <= Self::SUB_BUCKET_MASK {
            (index, 1)
        } else {
            let bucket = (index >> Self::HALF_MAGNITUDE) - 1;
            (
                (index - (bucket << Self::HALF_MAGNITUDE)) << bucket,
                1 << bucket,
            )
        }
    }

    /// Counts one `value`; one above `max` is counted as `max`.
    #[inline(always)]
    pub(crate) fn record(&mut self, value: u64) {
        let i = Self::index(value.min(self.max));
        // `index(max) < counts.len()` by construction, so this never misses.
        if let Some(c) = self.counts.get_mut(i) {
            c.increment();
        }
    }

    /// Adds every count to `histogram` (of `SIGFIG` significant digits and a range covering
    /// `max`, so each lands in the bucket it came from).
    pub(crate) fn add_to(&self, histogram: &mut Histogram<u64>) {
        for (i, &c) in self.counts.iter().enumerate() {
            if c.as_u64() != 0 {
                histogram.saturating_record_n(self.range_of(i).0, c.as_u64());
            }
        }
    }

    /// The same figures as [`LatencySummary::of`] on the equivalent histogram, in one pass.
    #[cfg(test)]
    pub(crate) fn summary(&self) -> LatencySummary {
        self.summary_of(self.counts.iter().map(|c| c.as_u64()).sum())
    }

    /// [`summary`](Self::summary) given the number of values recorded, which the caller
    /// tallies: the scan then stops at the highest recorded value instead of summing every
    /// bucket first. Should saturated `u32` counts hold fewer, the summary covers what they
    /// hold.
    pub(crate) fn summary_of(&self, count: u64) -> LatencySummary {
        if count == 0 {
            return LatencySummary::default();
        }
        let targets = QUANTILES.map(|q| ((q * count as f64).ceil() as u64).clamp(1, count));
        let mut values = [0u64; QUANTILES.len()];
        let mut next = 0;
        let mut seen = 0u64;
        let mut weighted_sum = 0f64;
        let mut max = 0;
        // Stops at the highest recorded value, typically a few hundred buckets in.
        for (i, &c) in self.counts.iter().enumerate() {
            let n = c.as_u64();
            if n == 0 {
                continue;
            }
            let (low, width) = self.range_of(i);
            let highest = low + width - 1;
            seen += n;
            weighted_sum += (low + width / 2) as f64 * n as f64;
            max = highest;
            while next < targets.len() && seen >= targets[next] {
                values[next] = highest;
                next += 1;
            }
            if seen == count {
                break;
            }
        }
        if seen < count {
            // Saturated counts: quantiles past what they hold are the maximum.
            for v in &mut values[next..] {
                *v = max;
            }
        }
        let [p50_us, p90_us, p99_us, p99_9_us, p99_99_us] = values;
        LatencySummary {
            count: seen,
            p50_us,
            p90_us,
            p99_us,
            p99_9_us,
            p99_99_us,
            max_us: max,
            mean_us: weighted_sum / seen.max(1) as f64,
        }
    }

    /// Bytes of counts held.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{new_histogram, CONN_SIGFIG, TOTAL_SIGFIG};

    fn values() -> Vec<u64> {
        let mut v: Vec<u64> = (0..5000).collect();
        let mut x = 1u64;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            v.push((x >> 20) % 60_000_000);
        }
        v.extend([
            1023, 1024, 2047, 2048, 2049, 4095, 4096, 59_999_999, 60_000_000,
        ]);
        v
    }

    /// Same layout as HdrHistogram: converted counts equal the histogram recorded directly,
    /// and the summaries agree.
    fn check_layout<const SIGFIG: u8>() {
        let max = 60_000_000;
        let mut buckets = Buckets::<u64, SIGFIG>::new(max);
        let mut direct: Histogram<u64> = new_histogram(max, SIGFIG);
        for v in values() {
            buckets.record(v);
            direct.record(v).unwrap();
        }
        let mut converted: Histogram<u64> = new_histogram(max, SIGFIG);
        buckets.add_to(&mut converted);
        let recorded = |h: &Histogram<u64>| -> Vec<(u64, u64)> {
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        };
        assert_eq!(recorded(&direct), recorded(&converted), "sigfig {SIGFIG}");
        let ours = buckets.summary();
        let theirs = LatencySummary::of(&direct);
        assert_eq!(
            (ours.count, ours.quantile_values(), ours.max_us),
            (theirs.count, theirs.quantile_values(), theirs.max_us),
            "sigfig {SIGFIG}"
        );
        assert!((ours.mean_us - theirs.mean_us).abs() <= 1e-9 * theirs.mean_us);
    }

    /// Same layout as HdrHistogram: converted counts equal the histogram recorded directly,
    /// and the summaries agree.
    #[test]
    fn matches_hdrhistogram_layout() {
        check_layout::<TOTAL_SIGFIG>();
        check_layout::<CONN_SIGFIG>();
        check_layout::<1>();
        check_layout::<4>();
    }

    #[test]
    fn clamps_to_max_and_saturates_counts() {
        let mut b = Buckets::<u32, 2>::new(1000);
        b.record(5_000_000);
        assert_eq!(b.summary().count, 1);
        assert!(b.summary().max_us >= 1000 && b.summary().max_us < 1010);
        b.counts[3] = u32::MAX;
        b.record(3);
        assert_eq!(b.counts[3], u32::MAX);
        // The caller's tally is past what saturated counts hold: the summary covers what is held.
        let held = u64::from(u32::MAX) + 1;
        let s = b.summary_of(held + 5);
        assert_eq!((s.count, s.p50_us), (held, 3));
        assert!(s.max_us >= 1000, "{s:?}");
        let s = b.summary_of(held * 10);
        assert_eq!(s.count, held);
        assert!(s.quantile_values().iter().all(|&v| v == s.max_us), "{s:?}");
    }

    #[test]
    fn memory_per_histogram() {
        // The figures quoted in the module docs and configs/default.toml.
        assert_eq!(Buckets::<u64, 3>::new(60_000_000).heap_bytes() / 1024, 134);
        assert_eq!(Buckets::<u32, 2>::new(60_000_000).heap_bytes() / 1024, 9);
    }
}

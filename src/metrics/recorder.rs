//! [`ShardMetrics`]: the histograms one shard records into, on its own thread, without locks.

use std::cell::Cell;

use ahash::HashMap;

use super::buckets::Buckets;
use super::snapshot::{LatencySummary, MetricsSnapshot, PrefixLatency};
use super::window::WindowMax;
use super::{max_us, new_histogram, CONN_SIGFIG, TOTAL_SIGFIG};
use crate::config::MetricsConfig;

/// Distinct topic prefixes one shard keeps histograms for; later prefixes share
/// [`OTHER_PREFIX`]. Bounds the memory a publisher inventing topics can make a shard use
/// (each prefix holds two 3-digit histograms, about 268 KiB at the default range).
pub const MAX_PREFIXES: usize = 64;
/// The prefix that stands for every prefix past [`MAX_PREFIXES`].
pub const OTHER_PREFIX: &str = "(other)";

const NO_SLOT: usize = usize::MAX;

/// One shard's latency histograms. Owned by the shard thread; not `Sync`.
///
/// Cost model: [`record_delivery`](Self::record_delivery) does no locking and, after a
/// connection's first frame and a prefix's first frame, no allocation: a subtraction and a
/// division per latency, a cached comparison of the topic's prefix with the previous frame's,
/// a cached connection slot, and three histogram increments. The first frame to a connection
/// allocates its histogram (~10 KiB); the first frame of a new prefix allocates two (~268 KiB).
#[derive(Debug)]
pub struct ShardMetrics {
    max_us: u64,
    prefix_levels: usize,
    prefixes: Vec<PrefixHistograms>,
    prefix_ids: HashMap<Box<str>, usize>,
    /// Index of [`OTHER_PREFIX`] in `prefixes`, once created.
    other_prefix: Option<usize>,
    /// The last few prefixes seen and their indexes: consecutive frames usually share one,
    /// and a subscriber to `plant/#` sees a few gateways' bursts interleaved.
    prefix_cache: [CachedPrefix; PREFIX_CACHE_WAYS],
    /// The way the next miss replaces (round robin).
    prefix_cache_next: usize,
    conns: Vec<Option<ConnHistogram>>,
    conn_slots: HashMap<u64, usize>,
    free_conn_slots: Vec<usize>,
    cached_conn_id: u64,
    cached_conn_slot: usize,
    saturated: u64,
    source_ahead: u64,
    /// Windowed maxima of the two latencies (`window.rs`), for `/metrics`.
    ingest_window: WindowMax,
    source_window: WindowMax,
}

/// Ways of the prefix cache: a miss costs a scan of the topic and a hash lookup (~15 ns), a
/// way one comparison of a few words.
const PREFIX_CACHE_WAYS: usize = 4;

#[derive(Debug)]
struct CachedPrefix {
    prefix: String,
    /// Whether `prefix` has `prefix_levels` levels (a longer topic shares it only then).
    full: bool,
    /// Index into `prefixes`; `NO_SLOT` while the way is empty.
    index: usize,
}

impl Default for CachedPrefix {
    fn default() -> Self {
        CachedPrefix {
            prefix: String::new(),
            full: false,
            index: NO_SLOT,
        }
    }
}

impl CachedPrefix {
    /// Whether `topic`'s prefix is this one.
    #[inline(always)]
    fn holds(&self, topic: &[u8]) -> bool {
        let prefix = self.prefix.as_bytes();
        self.index != NO_SLOT
            && starts_with(topic, prefix)
            && match topic.get(prefix.len()) {
                None => true,
                Some(&b) => b == b'/' && self.full,
            }
    }
}

#[derive(Debug)]
struct PrefixHistograms {
    name: Box<str>,
    ingest: Buckets<u64, TOTAL_SIGFIG>,
    source: Buckets<u64, TOTAL_SIGFIG>,
}

#[derive(Debug)]
struct ConnHistogram {
    id: u64,
    ingest: Buckets<u32, CONN_SIGFIG>,
    frames: u64,
    /// The summary computed at the last snapshot, reused while `frames` has not changed, so a
    /// snapshot of thousands of idle connections does not rescan their histograms.
    summary: Cell<Option<LatencySummary>>,
}

impl ConnHistogram {
    fn summary(&self) -> LatencySummary {
        match self.summary.get() {
            // (A summary of saturated counts never matches and is recomputed: harmless.)
            Some(s) if s.count == self.frames => s,
            _ => {
                let s = self.ingest.summary_of(self.frames);
                self.summary.set(Some(s));
                s
            }
        }
    }
}

impl ShardMetrics {
    pub fn new(config: &MetricsConfig) -> ShardMetrics {
        ShardMetrics {
            max_us: max_us(config.histogram_max_ms),
            prefix_levels: config.prefix_levels.max(1),
            prefixes: Vec::new(),
            prefix_ids: HashMap::default(),
            other_prefix: None,
            prefix_cache: Default::default(),
            prefix_cache_next: 0,
            conns: Vec::new(),
            conn_slots: HashMap::default(),
            free_conn_slots: Vec::new(),
            cached_conn_id: 0,
            cached_conn_slot: NO_SLOT,
            saturated: 0,
            source_ahead: 0,
            ingest_window: WindowMax::default(),
            source_window: WindowMax::default(),
        }
    }

    /// One DATA frame fully written to subscriber connection `conn_id` at `now_ns` (ns since
    /// the UNIX epoch; read the clock once per write, not per frame). `ingest_ts_ns` and
    /// `source_ts_ns` come from the DATA header; a `source_ts_ns` of 0 (unknown) skips the
    /// source histogram. Latencies above `histogram_max_ms` are recorded as the maximum.
    ///
    /// Call it only for live frames: snapshot and replay frames carry an old ingest time
    /// ([`super::data_frame_stamp`] filters them).
    #[inline]
    pub fn record_delivery(
        &mut self,
        conn_id: u64,
        topic: &str,
        ingest_ts_ns: u64,
        source_ts_ns: u64,
        now_ns: u64,
    ) {
        let ingest_us = self.clamp_us(now_ns.saturating_sub(ingest_ts_ns));
        let prefix = self.prefix_index(topic);
        self.prefixes[prefix].ingest.record(ingest_us);
        self.ingest_window.record(now_ns, ingest_us);
        if source_ts_ns != 0 {
            if source_ts_ns <= now_ns {
                let source_us = self.clamp_us(now_ns - source_ts_ns);
                self.prefixes[prefix].source.record(source_us);
                self.source_window.record(now_ns, source_us);
            } else {
                self.source_ahead += 1;
            }
        }
        let slot = self.conn_slot(conn_id);
        if let Some(conn) = &mut self.conns[slot] {
            conn.ingest.record(ingest_us);
            conn.frames += 1;
        }
    }

    /// Connection `conn_id` closed: drops its histogram. Unknown ids are ignored.
    pub fn remove_conn(&mut self, conn_id: u64) {
        if let Some(slot) = self.conn_slots.remove(&conn_id) {
            self.conns[slot] = None;
            self.free_conn_slots.push(slot);
            if self.cached_conn_slot == slot {
                self.cached_conn_slot = NO_SLOT;
            }
        }
    }

    /// Connections with a histogram (those that were written a live frame and are not removed).
    pub fn tracked_conns(&self) -> usize {
        self.conn_slots.len()
    }

    /// The histograms as they are now, to publish to other threads (call every ~250 ms).
    /// Allocates: builds each prefix's two histograms (~270 KiB per prefix) and summarises each
    /// connection whose count changed since the last snapshot.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut snapshot = MetricsSnapshot::empty(self.max_us);
        for p in &self.prefixes {
            let mut latency = PrefixLatency {
                ingest_to_write: new_histogram(self.max_us, TOTAL_SIGFIG),
                source_to_write: new_histogram(self.max_us, TOTAL_SIGFIG),
            };
            p.ingest.add_to(&mut latency.ingest_to_write);
            p.source.add_to(&mut latency.source_to_write);
            snapshot.add_prefix(&p.name, latency);
        }
        for conn in self.conns.iter().flatten() {
            snapshot.connections.insert(conn.id, conn.summary());
        }
        snapshot.saturated = self.saturated;
        snapshot.source_ahead = self.source_ahead;
        snapshot.ingest_window = self.ingest_window;
        snapshot.source_window = self.source_window;
        snapshot
    }

    #[inline]
    fn clamp_us(&mut self, ns: u64) -> u64 {
        let us = ns / 1000;
        if us > self.max_us {
            self.saturated += 1;
            self.max_us
        } else {
            us
        }
    }

    #[inline]
    fn prefix_index(&mut self, topic: &str) -> usize {
        let topic_bytes = topic.as_bytes();
        for way in &self.prefix_cache {
            if way.holds(topic_bytes) {
                return way.index;
            }
        }
        self.prefix_index_slow(topic)
    }

    #[cold]
    fn prefix_index_slow(&mut self, topic: &str) -> usize {
        let (prefix, full) = topic_prefix(topic, self.prefix_levels);
        let index = match self.prefix_ids.get(prefix) {
            Some(&index) => index,
            None if self.prefix_ids.len() < MAX_PREFIXES => {
                let index = self.push_prefix(prefix);
                self.prefix_ids.insert(prefix.into(), index);
                index
            }
            None => match self.other_prefix {
                Some(index) => index,
                None => {
                    let index = self.push_prefix(OTHER_PREFIX);
                    self.other_prefix = Some(index);
                    index
                }
            },
        };
        let way = &mut self.prefix_cache[self.prefix_cache_next];
        self.prefix_cache_next = (self.prefix_cache_next + 1) % PREFIX_CACHE_WAYS;
        way.prefix.clear();
        way.prefix.push_str(prefix);
        way.full = full;
        way.index = index;
        index
    }

    fn push_prefix(&mut self, name: &str) -> usize {
        self.prefixes.push(PrefixHistograms {
            name: name.into(),
            ingest: Buckets::new(self.max_us),
            source: Buckets::new(self.max_us),
        });
        self.prefixes.len() - 1
    }

    #[inline]
    fn conn_slot(&mut self, conn_id: u64) -> usize {
        if self.cached_conn_slot != NO_SLOT && self.cached_conn_id == conn_id {
            return self.cached_conn_slot;
        }
        self.conn_slot_slow(conn_id)
    }

    #[cold]
    fn conn_slot_slow(&mut self, conn_id: u64) -> usize {
        let slot = match self.conn_slots.get(&conn_id) {
            Some(&slot) => slot,
            None => {
                let conn = ConnHistogram {
                    id: conn_id,
                    ingest: Buckets::new(self.max_us),
                    frames: 0,
                    summary: Cell::new(None),
                };
                let slot = match self.free_conn_slots.pop() {
                    Some(slot) => {
                        self.conns[slot] = Some(conn);
                        slot
                    }
                    None => {
                        self.conns.push(Some(conn));
                        self.conns.len() - 1
                    }
                };
                self.conn_slots.insert(conn_id, slot);
                slot
            }
        };
        self.cached_conn_id = conn_id;
        self.cached_conn_slot = slot;
        slot
    }
}

/// `haystack.starts_with(prefix)` without a call to `memcmp`: prefixes are a few words long,
/// and this runs for every frame.
#[inline(always)]
fn starts_with(haystack: &[u8], prefix: &[u8]) -> bool {
    if haystack.len() < prefix.len() {
        return false;
    }
    let word = |bytes: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    let mut i = 0;
    while i + 8 <= prefix.len() {
        if word(haystack, i) != word(prefix, i) {
            return false;
        }
        i += 8;
    }
    while i < prefix.len() {
        if haystack[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The first `levels` levels of `topic`, and whether the topic has that many (only then does a
/// longer topic share the prefix).
fn topic_prefix(topic: &str, levels: usize) -> (&str, bool) {
    let mut seen = 0;
    for (i, b) in topic.bytes().enumerate() {
        if b == b'/' {
            seen += 1;
            if seen == levels {
                return (&topic[..i], true);
            }
        }
    }
    (topic, seen + 1 >= levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_700_000_000_000_000_000;

    fn config(prefix_levels: usize) -> MetricsConfig {
        MetricsConfig {
            prefix_levels,
            ..MetricsConfig::default()
        }
    }

    #[test]
    fn topic_prefix_levels() {
        assert_eq!(topic_prefix("plant/line1/temp", 2), ("plant/line1", true));
        assert_eq!(topic_prefix("plant/line1", 2), ("plant/line1", true));
        assert_eq!(topic_prefix("plant", 2), ("plant", false));
        assert_eq!(topic_prefix("a//b", 2), ("a/", true));
        assert_eq!(topic_prefix("a/b/c", 1), ("a", true));
        assert_eq!(topic_prefix("", 1), ("", true));
    }

    /// The cached prefix must give the same answer as computing it afresh, whatever the order.
    #[test]
    fn prefix_cache_agrees_with_the_definition() {
        let topics = [
            "plant",
            "plant/line1",
            "plant/line1/t",
            "plant/line10/t",
            "plant/line1x",
            "plant/",
            "plant//x",
            "plantx/line1",
            "other/a/b",
            "plant/line1/t/u",
            "plant",
            "p",
        ];
        let orders: [Vec<&str>; 3] = [
            topics.to_vec(),
            topics.iter().rev().copied().collect(),
            (0..topics.len() * 3)
                .map(|i| topics[(i * 7) % topics.len()])
                .collect(),
        ];
        for levels in 1..=3 {
            let mut m = ShardMetrics::new(&config(levels));
            for topic in orders.iter().flatten() {
                let index = m.prefix_index(topic);
                assert_eq!(
                    &*m.prefixes[index].name,
                    topic_prefix(topic, levels).0,
                    "{topic} at {levels} levels"
                );
            }
        }
    }

    #[test]
    fn records_prefix_totals_and_connections() {
        let mut m = ShardMetrics::new(&config(2));
        for i in 0..100u64 {
            // ingest -> write: 1 ms .. 100 ms; source -> write: 2 ms more.
            let now = T0 + 200 * MS;
            let ingest = now - (i + 1) * MS;
            m.record_delivery(1 + i % 2, "plant/line1/temp", ingest, ingest - 2 * MS, now);
        }
        m.record_delivery(3, "plant/line2/temp", T0, 0, T0 + 5 * MS);
        let s = m.snapshot();
        assert_eq!(s.ingest_to_write.len(), 101);
        assert_eq!(s.source_to_write.len(), 100);
        let line1 = &s.prefixes["plant/line1"];
        assert_eq!(line1.ingest_to_write.len(), 100);
        let p50 = line1.ingest_to_write.value_at_quantile(0.5);
        assert!((49_900..=50_100).contains(&p50), "{p50}");
        let max = line1.source_to_write.max();
        assert!((101_900..=102_100).contains(&max), "{max}");
        assert_eq!(s.prefixes["plant/line2"].source_to_write.len(), 0);
        assert_eq!(s.connections[&1].count, 50);
        assert_eq!(s.connections[&2].count, 50);
        let c3 = s.connections[&3];
        assert_eq!(c3.count, 1);
        assert!((4_950..=5_050).contains(&c3.max_us), "{c3:?}");
        assert_eq!(s.saturated, 0);
    }

    #[test]
    fn saturates_and_counts_clock_skew() {
        let mut m = ShardMetrics::new(&MetricsConfig {
            histogram_max_ms: 10,
            ..MetricsConfig::default()
        });
        m.record_delivery(1, "a", T0, T0 + MS, T0 + 60_000 * MS);
        m.record_delivery(1, "a", T0, T0 + MS, T0);
        // An ingest stamp later than now (a frame from a shard whose clock read ran ahead)
        // counts as zero, never as a huge unsigned wrap.
        m.record_delivery(1, "a", T0 + MS, 0, T0);
        let s = m.snapshot();
        assert_eq!(s.saturated, 2, "ingest and source of the first frame");
        assert_eq!(s.source_ahead, 1);
        assert_eq!(s.ingest_to_write.len(), 3);
        assert!(s.ingest_to_write.max() >= 10_000 && s.ingest_to_write.max() < 10_100);
        assert_eq!(s.source_to_write.len(), 1);
    }

    #[test]
    fn remove_conn_frees_and_reuses_the_slot() {
        let mut m = ShardMetrics::new(&config(2));
        m.record_delivery(1, "a/b", T0, 0, T0 + MS);
        m.record_delivery(2, "a/b", T0, 0, T0 + MS);
        assert_eq!(m.tracked_conns(), 2);
        m.remove_conn(2);
        m.remove_conn(99);
        assert_eq!(m.tracked_conns(), 1);
        // The cached slot of 2 must not leak into a new connection's figures.
        m.record_delivery(3, "a/b", T0, 0, T0 + MS);
        m.record_delivery(2, "a/b", T0, 0, T0 + MS);
        let s = m.snapshot();
        assert_eq!(m.conns.len(), 3);
        assert_eq!(s.connections.len(), 3);
        assert_eq!(s.connections[&1].count, 1);
        assert_eq!(
            s.connections[&2].count, 1,
            "a fresh histogram after removal"
        );
        assert_eq!(s.connections[&3].count, 1);
    }

    #[test]
    fn prefixes_past_the_limit_share_other() {
        let mut m = ShardMetrics::new(&config(1));
        for i in 0..MAX_PREFIXES + 10 {
            m.record_delivery(1, &format!("p{i}/x"), T0, 0, T0 + MS);
        }
        m.record_delivery(1, "p0/y", T0, 0, T0 + MS);
        let s = m.snapshot();
        assert_eq!(s.prefixes.len(), MAX_PREFIXES + 1);
        assert_eq!(s.prefixes[OTHER_PREFIX].ingest_to_write.len(), 10);
        assert_eq!(s.prefixes["p0"].ingest_to_write.len(), 2);
        assert_eq!(s.ingest_to_write.len(), MAX_PREFIXES as u64 + 11);
    }

    #[test]
    fn connection_summary_is_refreshed_when_its_count_changes() {
        let mut m = ShardMetrics::new(&config(2));
        m.record_delivery(1, "a/b", T0, 0, T0 + MS);
        assert_eq!(m.snapshot().connections[&1].count, 1);
        assert_eq!(m.snapshot().connections[&1].count, 1);
        m.record_delivery(1, "a/b", T0, 0, T0 + 9 * MS);
        let c = m.snapshot().connections[&1];
        assert_eq!(c.count, 2);
        assert!(c.max_us >= 9_000, "{c:?}");
    }
}

//! [`MetricsSnapshot`]: a shard's histograms as a value, merged across shards and rendered.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::{Counter, Histogram};
use serde_json::{json, Value};

use super::{max_us, new_histogram, TOTAL_SIGFIG};
use crate::config::MetricsConfig;

/// The quantiles every summary reports, in order.
pub(crate) const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 0.9999];

/// Latency histograms at one moment: from one shard ([`super::ShardMetrics::snapshot`]) or
/// merged from several ([`MetricsSnapshot::merge`]). All values are microseconds; cumulative
/// since the engine started.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    /// The highest value the histograms track (µs): `histogram_max_ms * 1000`.
    pub max_us: u64,
    /// Ingest → socket write of every live DATA frame to every subscriber.
    pub ingest_to_write: Histogram<u64>,
    /// Source timestamp → socket write, for frames whose source set a timestamp.
    pub source_to_write: Histogram<u64>,
    /// The same two, by topic prefix (`metrics.prefix_levels` levels; [`super::OTHER_PREFIX`]
    /// past [`super::MAX_PREFIXES`] per shard).
    pub prefixes: BTreeMap<String, PrefixLatency>,
    /// Ingest → write per subscriber connection, by connection id (2 significant digits).
    pub connections: BTreeMap<u64, LatencySummary>,
    /// Values above `max_us`, recorded as `max_us`.
    pub saturated: u64,
    /// Frames whose source timestamp was later than their write (clock skew): not recorded.
    pub source_ahead: u64,
    /// Windowed maxima of the two latencies (`window.rs`): what `/metrics` reports as
    /// `lanpush_*_max_seconds`.
    pub ingest_window: super::WindowMax,
    pub source_window: super::WindowMax,
}

/// The two latencies of one topic prefix.
#[derive(Debug, Clone)]
pub struct PrefixLatency {
    pub ingest_to_write: Histogram<u64>,
    pub source_to_write: Histogram<u64>,
}

/// The figures reported for one histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p99_9_us: u64,
    pub p99_99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    /// Reads `histogram` in one pass over its recorded buckets. Quantiles are the highest value
    /// equivalent to the bucket the quantile falls in, as `Histogram::value_at_quantile` reports.
    pub fn of<T: Counter>(histogram: &Histogram<T>) -> LatencySummary {
        let count = histogram.len();
        if count == 0 {
            return LatencySummary::default();
        }
        let targets = QUANTILES.map(|q| ((q * count as f64).ceil() as u64).clamp(1, count));
        let mut values = [0u64; QUANTILES.len()];
        let mut next = 0;
        let mut seen: u64 = 0;
        let mut weighted_sum = 0f64;
        for bucket in histogram.iter_recorded() {
            let n = bucket.count_at_value().as_u64();
            seen += n;
            let value = bucket.value_iterated_to();
            // The bucket's middle, as `Histogram::mean` takes it.
            let middle = histogram.median_equivalent(value);
            weighted_sum += middle as f64 * n as f64;
            while next < targets.len() && seen >= targets[next] {
                values[next] = value;
                next += 1;
            }
        }
        let [p50_us, p90_us, p99_us, p99_9_us, p99_99_us] = values;
        LatencySummary {
            count,
            p50_us,
            p90_us,
            p99_us,
            p99_9_us,
            p99_99_us,
            max_us: histogram.max(),
            mean_us: weighted_sum / count as f64,
        }
    }

    /// The quantile values in the order of [`QUANTILES`].
    #[cfg(test)]
    pub(crate) fn quantile_values(&self) -> [u64; QUANTILES.len()] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p99_9_us,
            self.p99_99_us,
        ]
    }

    pub fn to_json(&self) -> Value {
        json!({
            "count": self.count,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p99_9_us": self.p99_9_us,
            "p99_99_us": self.p99_99_us,
            "max_us": self.max_us,
            "mean_us": (self.mean_us * 10.0).round() / 10.0,
        })
    }
}

impl MetricsSnapshot {
    /// A snapshot with nothing recorded, for histograms of `config.histogram_max_ms`.
    pub fn new(config: &MetricsConfig) -> MetricsSnapshot {
        MetricsSnapshot::empty(max_us(config.histogram_max_ms))
    }

    pub(crate) fn empty(max_us: u64) -> MetricsSnapshot {
        MetricsSnapshot {
            max_us,
            ingest_to_write: new_histogram(max_us, TOTAL_SIGFIG),
            source_to_write: new_histogram(max_us, TOTAL_SIGFIG),
            prefixes: BTreeMap::new(),
            connections: BTreeMap::new(),
            saturated: 0,
            source_ahead: 0,
            ingest_window: Default::default(),
            source_window: Default::default(),
        }
    }

    /// Adds one prefix's histograms to the prefix and to the totals.
    pub(crate) fn add_prefix(&mut self, name: &str, latency: PrefixLatency) {
        add_histogram(&mut self.ingest_to_write, &latency.ingest_to_write);
        add_histogram(&mut self.source_to_write, &latency.source_to_write);
        match self.prefixes.get_mut(name) {
            Some(mine) => {
                add_histogram(&mut mine.ingest_to_write, &latency.ingest_to_write);
                add_histogram(&mut mine.source_to_write, &latency.source_to_write);
            }
            None => {
                self.prefixes.insert(name.to_string(), latency);
            }
        }
    }

    /// Adds `other` (another shard's snapshot) into this one: histograms are added, counters
    /// summed, connections gathered (a connection lives on one shard; should the same id
    /// appear twice, the entry with more frames is kept).
    pub fn merge(&mut self, other: &MetricsSnapshot) {
        for (name, latency) in &other.prefixes {
            self.add_prefix(name, latency.clone());
        }
        for (&id, summary) in &other.connections {
            let entry = self.connections.entry(id).or_default();
            if summary.count >= entry.count {
                *entry = *summary;
            }
        }
        self.saturated += other.saturated;
        self.source_ahead += other.source_ahead;
        self.ingest_window.merge(&other.ingest_window);
        self.source_window.merge(&other.source_window);
    }

    /// Every histogram's [`LatencySummary`], as JSON (microseconds):
    ///
    /// ```json
    /// { "unit": "us", "histogram_max_us": 60000000, "saturated": 0, "source_ahead": 0,
    ///   "ingest_to_write": {"count": 9, "p50_us": 41, "p90_us": 63, "p99_us": 90,
    ///                       "p99_9_us": 90, "p99_99_us": 90, "max_us": 90, "mean_us": 44.2},
    ///   "source_to_write": {...},
    ///   "prefixes": {"plant/line1": {"ingest_to_write": {...}, "source_to_write": {...}}},
    ///   "connections": {"17": {"ingest_to_write": {...}}} }
    /// ```
    pub fn to_json(&self) -> Value {
        let prefixes: serde_json::Map<String, Value> = self
            .prefixes
            .iter()
            .map(|(name, p)| {
                let v = json!({
                    "ingest_to_write": LatencySummary::of(&p.ingest_to_write).to_json(),
                    "source_to_write": LatencySummary::of(&p.source_to_write).to_json(),
                });
                (name.clone(), v)
            })
            .collect();
        let connections: serde_json::Map<String, Value> = self
            .connections
            .iter()
            .map(|(id, s)| (id.to_string(), json!({ "ingest_to_write": s.to_json() })))
            .collect();
        json!({
            "unit": "us",
            "histogram_max_us": self.max_us,
            "saturated": self.saturated,
            "source_ahead": self.source_ahead,
            "ingest_to_write": LatencySummary::of(&self.ingest_to_write).to_json(),
            "source_to_write": LatencySummary::of(&self.source_to_write).to_json(),
            "prefixes": prefixes,
            "connections": connections,
        })
    }
}

/// Adds `source` into `target`. Histograms of one engine share their bounds, so `add` succeeds;
/// for one with a wider range (another configuration), values are recorded saturating.
fn add_histogram(target: &mut Histogram<u64>, source: &Histogram<u64>) {
    if source.is_empty() {
        return;
    }
    if target.add(source).is_err() {
        for bucket in source.iter_recorded() {
            target.saturating_record_n(bucket.value_iterated_to(), bucket.count_at_value());
        }
    }
}

/// A text table of [`MetricsSnapshot::to_json`]'s document, for `lanpush stats`: totals, then
/// each prefix, then each connection. Missing or malformed parts are skipped, never a panic.
pub fn render_latency_table(latency: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (µs)", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    let mut row = |label: &str, s: Option<&Value>| {
        let Some(s) = s.filter(|s| s.is_object()) else {
            return;
        };
        let field = |key: &str| s.get(key).and_then(Value::as_u64).unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<32} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            label,
            field("count"),
            field("p50_us"),
            field("p90_us"),
            field("p99_us"),
            field("p99_9_us"),
            field("p99_99_us"),
            field("max_us"),
        );
    };
    row("ingest -> write", latency.get("ingest_to_write"));
    row("source -> write", latency.get("source_to_write"));
    if let Some(prefixes) = latency.get("prefixes").and_then(Value::as_object) {
        for (name, p) in prefixes {
            row(&format!("  {name}  ingest"), p.get("ingest_to_write"));
            row(&format!("  {name}  source"), p.get("source_to_write"));
        }
    }
    if let Some(conns) = latency.get("connections").and_then(Value::as_object) {
        for (id, c) in conns {
            row(&format!("  conn {id}  ingest"), c.get("ingest_to_write"));
        }
    }
    let saturated = latency
        .get("saturated")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let ahead = latency
        .get("source_ahead")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if saturated > 0 || ahead > 0 {
        let _ = writeln!(
            out,
            "saturated at the histogram maximum: {saturated}; source timestamp ahead of the write (clock skew): {ahead}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_histogram(60_000_000, TOTAL_SIGFIG);
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn summary_matches_value_at_quantile() {
        let cases: Vec<Vec<u64>> = vec![
            vec![42],
            (1..=1000).collect(),
            (1..=100_000).map(|i| i * 7 % 50_000 + 1).collect(),
            [vec![10; 9_990], vec![5_000_000; 10]].concat(),
        ];
        for values in cases {
            let h = histogram(values.iter().copied());
            let s = LatencySummary::of(&h);
            assert_eq!(s.count, h.len());
            for (q, v) in QUANTILES.iter().zip(s.quantile_values()) {
                assert_eq!(
                    v,
                    h.value_at_quantile(*q),
                    "q {q} of {} values",
                    values.len()
                );
            }
            assert_eq!(s.max_us, h.max());
            assert!((s.mean_us - h.mean()).abs() < 1e-6 * h.mean(), "{s:?}");
        }
        assert_eq!(
            LatencySummary::of(&histogram([])),
            LatencySummary::default()
        );
    }

    /// A known distribution comes out at the right percentiles (within 3 significant digits).
    #[test]
    fn known_distribution_percentiles() {
        // 1 .. 100_000 µs uniformly: p50 = 50_000, p99 = 99_000, p99.9 = 99_900.
        let s = LatencySummary::of(&histogram(1..=100_000));
        for (got, want) in [
            (s.p50_us, 50_000),
            (s.p90_us, 90_000),
            (s.p99_us, 99_000),
            (s.p99_9_us, 99_900),
            (s.p99_99_us, 99_990),
            (s.max_us, 100_000),
        ] {
            let error = got.abs_diff(want) as f64 / want as f64;
            assert!(error <= 0.001, "got {got}, want {want}");
        }
    }

    #[test]
    fn merge_adds_histograms_counters_and_connections() {
        let mut a = MetricsSnapshot::empty(60_000_000);
        a.add_prefix(
            "plant/line1",
            PrefixLatency {
                ingest_to_write: histogram([10, 20]),
                source_to_write: histogram([30]),
            },
        );
        a.connections.insert(
            1,
            LatencySummary {
                count: 2,
                ..Default::default()
            },
        );
        a.saturated = 1;
        let mut b = MetricsSnapshot::empty(60_000_000);
        b.add_prefix(
            "plant/line1",
            PrefixLatency {
                ingest_to_write: histogram([40]),
                source_to_write: histogram([]),
            },
        );
        b.add_prefix(
            "plant/line2",
            PrefixLatency {
                ingest_to_write: histogram([50]),
                source_to_write: histogram([60]),
            },
        );
        b.connections.insert(
            2,
            LatencySummary {
                count: 1,
                ..Default::default()
            },
        );
        b.source_ahead = 3;
        a.merge(&b);
        assert_eq!(a.ingest_to_write.len(), 4);
        assert_eq!(a.source_to_write.len(), 2);
        assert_eq!(a.prefixes["plant/line1"].ingest_to_write.len(), 3);
        assert_eq!(a.prefixes["plant/line2"].source_to_write.max(), 60);
        assert_eq!(a.connections.len(), 2);
        assert_eq!((a.saturated, a.source_ahead), (1, 3));
    }

    #[test]
    fn merge_of_a_wider_histogram_saturates() {
        let mut narrow = MetricsSnapshot::empty(1_000);
        let mut wide = MetricsSnapshot::empty(60_000_000);
        wide.add_prefix(
            "a",
            PrefixLatency {
                ingest_to_write: histogram([5, 5_000_000]),
                source_to_write: histogram([]),
            },
        );
        narrow.merge(&wide);
        assert_eq!(narrow.ingest_to_write.len(), 2);
        assert!(narrow.ingest_to_write.max() < 1_100);
    }

    #[test]
    fn json_has_every_figure_and_renders_as_a_table() {
        let mut s = MetricsSnapshot::empty(60_000_000);
        s.add_prefix(
            "plant/line1",
            PrefixLatency {
                ingest_to_write: histogram(1..=100),
                source_to_write: histogram([]),
            },
        );
        s.connections
            .insert(17, LatencySummary::of(&histogram(1..=10)));
        let json = s.to_json();
        let total = &json["ingest_to_write"];
        for key in [
            "count",
            "p50_us",
            "p90_us",
            "p99_us",
            "p99_9_us",
            "p99_99_us",
            "max_us",
        ] {
            assert!(total[key].is_u64(), "{key} in {total}");
        }
        assert_eq!(total["count"], 100);
        assert_eq!(total["p50_us"], 50);
        assert_eq!(
            json["prefixes"]["plant/line1"]["source_to_write"]["count"],
            0
        );
        assert_eq!(json["connections"]["17"]["ingest_to_write"]["max_us"], 10);
        let table = render_latency_table(&json);
        assert!(table.contains("plant/line1"), "{table}");
        assert!(table.contains("conn 17"), "{table}");
        assert_eq!(table.lines().count(), 6, "{table}");
        // Garbage in, no panic.
        render_latency_table(&json!({"ingest_to_write": 3, "prefixes": []}));
    }
}

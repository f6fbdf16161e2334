//! The output is checked line by line against the grammar of the text format 0.0.4, so a
//! format slip (a bad name, an unescaped label, a family split in two) fails here rather than
//! in a scraper.

use serde_json::json;

use super::*;
use crate::config::MetricsConfig;
use crate::metrics::exposition::{find, parse_exposition};
use crate::metrics::ShardMetrics;

fn stats() -> Value {
    json!({
        "uptime_ms": 12_345,
        "open_connections": 3,
        "totals": {
            "connections": 3, "subscriptions": 5, "topics": 7, "accepted": 9,
            "publishes_in": 1000, "delivered": 5000, "ring_bytes": 4096, "weird-key.x": 1,
            "not_a_number": "x",
        },
        "reactors": [
            {"reactor": 0, "connections": 2, "delivered": 3000},
            {"reactor": 1, "connections": 1, "delivered": 2000},
        ],
        "connections": [{"id": 1, "delivered": 10}],
    })
}

/// When [`snapshot`]'s frames were written (a few ms from a window boundary).
const T0: u64 = 1_700_000_000_000_000_000;

fn snapshot() -> MetricsSnapshot {
    let mut m = ShardMetrics::new(&MetricsConfig::default());
    let t0: u64 = T0;
    for i in 0..1000u64 {
        let topic = if i % 2 == 0 {
            "plant/line1/t"
        } else {
            "pl\"a\\nt\n/x/y"
        };
        m.record_delivery(i % 3, topic, t0, t0 - 1_000_000, t0 + (i + 1) * 1000);
    }
    m.record_delivery(9, "quiet/prefix", t0, 0, t0 + 1000);
    m.snapshot()
}

#[test]
fn output_follows_the_exposition_grammar() {
    let text = prometheus_text_at(&snapshot(), &stats(), T0 + 5_000_000_000);
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let gauge = find(&samples, "lanpush_connections", &[]).expect("connections gauge");
    assert_eq!(gauge.value, 3.0);
    assert!(text.contains("# TYPE lanpush_connections gauge"));
    assert!(text.contains("# TYPE lanpush_delivered_total counter"));
    assert!(text.contains("# TYPE lanpush_ring_bytes gauge"));
    assert_eq!(
        find(&samples, "lanpush_delivered_total", &[])
            .unwrap()
            .value,
        5000.0
    );
    assert!(find(&samples, "lanpush_weird_key_x_total", &[]).is_some());
    assert_eq!(
        find(
            &samples,
            "lanpush_reactor_delivered_total",
            &[("reactor", "1")]
        )
        .unwrap()
        .value,
        2000.0
    );
    // One family for the connection count: `lanpush_connections` (issue 13).
    assert!(!text.contains("lanpush_open_connections"), "{text}");
    assert_eq!(
        find(&samples, "lanpush_uptime_seconds", &[]).unwrap().value,
        12.345
    );

    // Totals: 1001 frames, ingest -> write 1 µs .. 1000 µs: cumulative buckets in seconds.
    let bucket = |le: &str| {
        find(
            &samples,
            "lanpush_ingest_to_write_seconds_bucket",
            &[("le", le)],
        )
        .unwrap_or_else(|| panic!("no bucket le={le}\n{text}"))
        .value
    };
    assert_eq!(bucket("0.00001"), 11.0, "1 ..= 10 µs, plus the 1 µs frame");
    assert_eq!(bucket("0.0001"), 101.0);
    assert_eq!(bucket("0.0005"), 501.0);
    assert_eq!(bucket("0.001"), 1001.0);
    assert_eq!(bucket("60"), 1001.0);
    assert_eq!(bucket("+Inf"), 1001.0);
    assert_eq!(
        find(&samples, "lanpush_ingest_to_write_max_seconds", &[])
            .unwrap()
            .value,
        0.001
    );
    let count = find(&samples, "lanpush_ingest_to_write_seconds_count", &[]).unwrap();
    assert_eq!(count.value, 1001.0);
    let sum = find(&samples, "lanpush_ingest_to_write_seconds_sum", &[]).unwrap();
    // True sum: 1000 * 1001 / 2 µs + 1 µs ≈ 0.5005 s.
    assert!((sum.value - 0.5005).abs() < 0.001, "{sum:?}");
    // Source -> write is 1 ms more, and skipped for the frame with no source timestamp.
    let source_count = find(&samples, "lanpush_source_to_write_seconds_count", &[]).unwrap();
    assert_eq!(source_count.value, 1000.0);

    // Per prefix, with the label escaped and read back intact.
    let odd = "pl\"a\\nt\n/x";
    let c = find(
        &samples,
        "lanpush_prefix_ingest_to_write_seconds_count",
        &[("prefix", odd)],
    )
    .unwrap_or_else(|| panic!("escaped prefix\n{text}"));
    assert_eq!(c.value, 500.0);
    // A prefix with no source timestamps: zero buckets, zero count.
    let q = find(
        &samples,
        "lanpush_prefix_source_to_write_seconds_bucket",
        &[("prefix", "quiet/prefix"), ("le", "+Inf")],
    )
    .unwrap();
    assert_eq!(q.value, 0.0);
    // The process families, once each.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert_eq!(
            samples.iter().filter(|s| s.name == name).count(),
            1,
            "{name}"
        );
    }
}

#[test]
fn empty_inputs_are_still_valid() {
    let empty = MetricsSnapshot::new(&MetricsConfig::default());
    for stats in [json!({}), json!(null), json!({"totals": 5, "reactors": {}})] {
        let text = prometheus_text(&empty, &stats);
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(find(&samples, "lanpush_ingest_to_write_seconds_count", &[]).is_some());
        assert!(!text.contains("lanpush_prefix_"));
    }
}

/// The checker itself must refuse the slips it is there to catch.
#[test]
fn the_grammar_check_refuses_slips() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total 1\n";
    parse_exposition(ok).unwrap();
    let histogram = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\n\
                     h_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n";
    parse_exposition(histogram).unwrap();
    for bad in [
        "# HELP a_total x\n# TYPE a_total counter\na_total 1",
        "# HELP 1a x\n# TYPE 1a counter\n1a 1\n",
        "# HELP a x\n# TYPE a gauge\na{b=\"x} 1\n",
        "# HELP a x\n# TYPE a gauge\na{b=\"x\\t\"} 1\n",
        "# HELP a x\n# TYPE a gauge\na{b=x} 1\n",
        "# HELP a x\n# TYPE a gauge\na 1.2.3\n",
        "# HELP a x\n# TYPE a gauge\na nan\n",
        "# HELP a x\n# TYPE a gauge\na 1e\n",
        "# HELP a x\n# TYPE a gauge\na 1\na 2\n",
        "# HELP a x\n# TYPE a gauge\nb 1\n",
        "# HELP a x\n# TYPE a gauge\n# HELP b x\n# TYPE b gauge\nb 1\n# TYPE a gauge\n",
        "# HELP a x\n# TYPE a summary\na 1\n",
        "# HELP a x\n# TYPE a summary\na_sum{quantile=\"0.5\"} 1\n",
        "# TYPE a gauge\na 1\n",
        "# HELP a_total x\n# TYPE a_total counter\na_total -1\n",
        "# HELP a x\n# TYPE a counter\na 1\n",
        // Histograms: no +Inf, not cumulative, +Inf != _count, a bucket without le.
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket 2\nh_sum 1\nh_count 2\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn escaping() {
    assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
    assert_eq!(float(0.000042), "0.000042");
    assert_eq!(float(f64::INFINITY), "+Inf");
    assert_eq!(
        engine_name("lanpush_", "delivered").0,
        "lanpush_delivered_total"
    );
    assert_eq!(
        engine_name("lanpush_", "topics"),
        ("lanpush_topics".into(), "gauge")
    );
}

#[test]
fn max_seconds_is_the_maximum_of_the_last_window_not_since_start() {
    let max_at = |now_ns: u64| {
        let text = prometheus_text_at(&snapshot(), &stats(), now_ns);
        let samples = parse_exposition(&text).unwrap();
        find(&samples, "lanpush_ingest_to_write_max_seconds", &[])
            .unwrap()
            .value
    };
    let window = crate::metrics::WINDOW_NS;
    assert_eq!(max_at(T0 + 1_000_000_000), 0.001, "in the window");
    assert_eq!(
        max_at(T0 + window + 1),
        0.001,
        "the window after: still shown"
    );
    assert_eq!(max_at(T0 + 2 * window + 1), 0.0, "aged out");
    // Merged across shards: the later shard's window wins, the earlier's becomes the previous.
    let mut m = ShardMetrics::new(&MetricsConfig::default());
    m.record_delivery(1, "a", T0 + window, 0, T0 + window + 7_000);
    let mut merged = snapshot();
    merged.merge(&m.snapshot());
    let text = prometheus_text_at(&merged, &stats(), T0 + window + 10_000);
    let samples = parse_exposition(&text).unwrap();
    let max = find(&samples, "lanpush_ingest_to_write_max_seconds", &[]).unwrap();
    assert_eq!(
        max.value, 0.001,
        "1 ms in the previous window beats 7 µs now"
    );
}

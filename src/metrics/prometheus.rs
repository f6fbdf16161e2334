//! The Prometheus text exposition format, version 0.0.4.

use std::collections::HashSet;
use std::fmt::Write as _;

use serde_json::Value;

use super::snapshot::MetricsSnapshot;

/// Totals of the stats document that are levels, not running counts.
const GAUGES: [&str; 5] = [
    "connections",
    "subscriptions",
    "topics",
    "ring_bytes",
    "retained_bytes",
];

/// HELP text of the engine counters the stats document is known to carry; others get a generic
/// one.
fn engine_help(name: &str) -> &'static str {
    match name {
        "connections" => "Connections held by the reactors.",
        "subscriptions" => "Subscriptions held by the reactors.",
        "topics" => "Topics owned by the reactors (each with a retained value).",
        "accepted" => "Connections accepted.",
        "publishes_in" => "Messages published into the engine.",
        "delivered" => "Live DATA frames queued to connections (once per connection).",
        "replayed" => "Snapshot, resume and catch-up frames queued to connections.",
        "gaps" => "GAP frames queued to connections.",
        "lagged" => "Live frames not queued to 'all' subscriptions that were behind (sent later by replay or named by a GAP).",
        "bytes_written" => "Bytes written to client sockets.",
        "writes" => "Vectored socket writes.",
        "conflated" => "Superseded values skipped by 'latest' subscriptions.",
        "slow_disconnects" => "Connections closed as slow consumers.",
        "protocol_errors" => "Connections closed for a malformed or forbidden frame.",
        "requests_refused" => "Requests refused with a non-fatal ERROR.",
        "shutdown_closes" => "Connections closed because the engine shut down.",
        "io_errors" => "Connections closed because a socket read or write failed.",
        "tls_failures" => "TLS connections closed by a failed handshake, a bad record or a refused client certificate.",
        "keepalive_timeouts" => "Connections closed for silence past their keep-alive.",
        "handshake_timeouts" => "Connections closed for not sending HELLO in time.",
        "ring_bytes" => "Bytes held in the replay rings.",
        "retained_bytes" => "Bytes of retained values (last value per topic) held.",
        "retained_evicted" => "Retained values dropped to keep within retained.max_bytes.",
        "frames_to_peers" => "DATA frames an owner reactor sent to other reactors with a matching subscription.",
        "topics_refused" => "Publishes to a new topic refused at limits.max_topics.",
        "reactor_failures" => "Reactor threads that failed (the engine then shuts down).",
        "throttled_turns" => "Reactor turns that held reads back for a full peer inbox.",
        "auth_failures" => "HELLOs refused for missing, unknown or wrong credentials (ERROR 16).",
        "acl_denied" => "PUBLISHes and SUBSCRIBEs refused by the identity's ACL (ERROR 17).",
        "acl_filtered" => "Frames a partly allowed subscription matched but may not receive.",
        "id_conflicts" => "HELLOs refused: the client id was held by another identity (ERROR 18).",
        "id_takeovers" => "Connections closed because the same identity took their client id over.",
        "rate_limited" => "PUBLISHes dropped over limits.max_publish_rate_per_s (ERROR 19).",
        "subscriptions_refused" => "SUBSCRIBEs refused at limits.max_subscriptions_per_connection.",
        "topic_limit" => "Topics or patterns refused as too long or too deep.",
        "address_refused" => "Connections refused at limits.max_connections_per_address.",
        "publishers_paused" => "Times a publishing connection stopped being read because a subscriber of its topic was a window behind (pacing).",
        "pace_releases" => "Subscribers released from pacing by the rule (stalled, or behind for too long).",
        "acks_sent" => "ACK frames sent to publishers that asked for acknowledgements.",
        "publish_duplicates" => "PUBLISHes of an acknowledged publisher dropped as already taken (a resend after a reconnect).",
        _ => "Engine figure from the stats document.",
    }
}

/// Renders the engine's counters (`stats`: the engine's `stats_json()` document, with `totals`,
/// `reactors`, `open_connections`, `uptime_ms`) and the latency histograms of `snapshot` in the
/// Prometheus text format 0.0.4 (`Content-Type: text/plain; version=0.0.4`).
///
/// - every numeric total `x` becomes `lanpush_x_total` (counter), or `lanpush_x` (gauge) for
///   `connections`, `subscriptions`, `topics` and `ring_bytes`; the per-reactor values become
///   `lanpush_reactor_x_total{reactor="N"}` / `lanpush_reactor_x{reactor="N"}`;
/// - latencies are histograms in seconds: `lanpush_ingest_to_write_seconds`,
///   `lanpush_source_to_write_seconds` (all prefixes), and `lanpush_prefix_*_seconds` with a
///   `prefix` label, each with cumulative `_bucket{le}` series at [`LATENCY_BUCKETS_US`] and
///   `+Inf`, `_sum` (mean × count from the histogram, an approximation) and `_count`, so a
///   dashboard charts `histogram_quantile(0.99, rate(..._bucket[5m]))`. Per-connection
///   histograms are left out (unbounded label cardinality): `/stats` has them;
/// - `process_*`: CPU seconds, resident and virtual memory, open and maximum descriptors, start
///   time, read from `/proc/self` (`process.rs`).
/// - `lanpush_*_max_seconds`: the highest latency of the last 10 to 20 s (`window.rs`), not
///   since start, so a spike shows and then ages out.
pub fn prometheus_text(snapshot: &MetricsSnapshot, stats: &Value) -> String {
    prometheus_text_at(snapshot, stats, crate::engine::now_unix_ns())
}

/// [`prometheus_text`] as read at `now_ns` (the windowed maxima depend on it).
pub(crate) fn prometheus_text_at(snapshot: &MetricsSnapshot, stats: &Value, now_ns: u64) -> String {
    let mut w = Writer {
        out: String::with_capacity(8192),
        families: HashSet::new(),
    };
    engine_metrics(&mut w, stats);
    multicast_metrics(&mut w, stats);
    latency_metrics(&mut w, snapshot, now_ns);
    if let Some(process) = super::process::ProcessStats::read() {
        process_metrics(&mut w, &process);
    }
    w.out
}

/// The standard `process_*` families (as Prometheus client libraries name them).
fn process_metrics(w: &mut Writer, p: &super::process::ProcessStats) {
    let families: [(&str, &str, &str, String); 6] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            float(p.cpu_seconds),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_memory_bytes.to_string(),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.virtual_memory_bytes.to_string(),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            p.open_fds.to_string(),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft RLIMIT_NOFILE).",
            p.max_fds
                .map_or_else(|| "+Inf".to_string(), |n| n.to_string()),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            float(p.start_time_seconds),
        ),
    ];
    for (name, kind, help, value) in families {
        if w.family(name, kind, help) {
            w.sample(name, &[], &value);
        }
    }
}

struct Writer {
    out: String,
    /// Families written so far: a name appears once, whatever the stats document holds.
    families: HashSet<String>,
}

impl Writer {
    /// Starts a family; false (write nothing) if one of that name was already written.
    fn family(&mut self, name: &str, kind: &str, help: &str) -> bool {
        if !self.families.insert(name.to_string()) {
            return false;
        }
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        true
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label_value(val));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }
}

/// The stats document's `multicast` list: `lanpush_multicast_<figure>_total{channel="N"}`.
fn multicast_metrics(w: &mut Writer, stats: &Value) {
    let Some(channels) = stats.get("multicast").and_then(Value::as_array) else {
        return;
    };
    let mut keys: Vec<&str> = Vec::new();
    for c in channels.iter().filter_map(Value::as_object) {
        for key in c.keys() {
            if key != "channel" && !keys.contains(&key.as_str()) {
                keys.push(key);
            }
        }
    }
    for key in keys {
        let name = format!("lanpush_multicast_{key}_total");
        let help = format!("Multicast channel figure {key} (docs/PROTOCOL.md section 12), summed over the reactors.");
        if !w.family(&name, "counter", &help) {
            continue;
        }
        for c in channels.iter().filter_map(Value::as_object) {
            let (Some(id), Some(value)) = (c.get("channel"), c.get(key).and_then(number)) else {
                continue;
            };
            let id = id.to_string();
            w.sample(&name, &[("channel", &id)], &value);
        }
    }
}

fn engine_metrics(w: &mut Writer, stats: &Value) {
    if let Some(totals) = stats.get("totals").and_then(Value::as_object) {
        for (key, value) in totals {
            let Some(value) = number(value) else {
                continue;
            };
            let (name, kind) = engine_name("lanpush_", key);
            if w.family(&name, kind, engine_help(key)) {
                w.sample(&name, &[], &value);
            }
        }
    }
    if let Some(reactors) = stats.get("reactors").and_then(Value::as_array) {
        // Keys in order of first appearance, so each family's samples are written together.
        let mut keys: Vec<&str> = Vec::new();
        for reactor in reactors.iter().filter_map(Value::as_object) {
            for key in reactor.keys() {
                if key != "reactor" && !keys.contains(&key.as_str()) {
                    keys.push(key);
                }
            }
        }
        for key in keys {
            let (name, kind) = engine_name("lanpush_reactor_", key);
            if !w.family(&name, kind, engine_help(key)) {
                continue;
            }
            for (i, reactor) in reactors.iter().enumerate() {
                let Some(value) = reactor.get(key).and_then(number) else {
                    continue;
                };
                let id = reactor
                    .get("reactor")
                    .map_or_else(|| i.to_string(), |v| v.to_string());
                w.sample(&name, &[("reactor", &id)], &value);
            }
        }
    }
    if let Some(ms) = stats.get("uptime_ms").and_then(Value::as_f64) {
        let name = "lanpush_uptime_seconds";
        if w.family(name, "gauge", "Seconds since the engine started.") {
            w.sample(name, &[], &float(ms / 1000.0));
        }
    }
}

/// Upper bounds (µs) of the latency histograms' buckets, 10 µs to 60 s, then `+Inf`: the
/// usual 1-2.5-5 steps, so `histogram_quantile()` over a window is within a step of the truth.
pub const LATENCY_BUCKETS_US: [u64; 21] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

fn latency_metrics(w: &mut Writer, s: &MetricsSnapshot, now_ns: u64) {
    const INGEST_HELP: &str = "Latency from engine ingest to the socket write of each DATA frame to each subscriber; _sum is approximated as histogram mean x count.";
    const SOURCE_HELP: &str = "Latency from the publisher's source timestamp to the socket write of each DATA frame to each subscriber (frames with a source timestamp); _sum is approximated as histogram mean x count.";
    for (name, help, histogram) in [
        (
            "lanpush_ingest_to_write_seconds",
            INGEST_HELP,
            &s.ingest_to_write,
        ),
        (
            "lanpush_source_to_write_seconds",
            SOURCE_HELP,
            &s.source_to_write,
        ),
    ] {
        if w.family(name, "histogram", help) {
            histogram_samples(w, name, &[], histogram);
        }
    }
    for (name, window) in [
        ("lanpush_ingest_to_write_max_seconds", &s.ingest_window),
        ("lanpush_source_to_write_max_seconds", &s.source_window),
    ] {
        if w.family(
            name,
            "gauge",
            "Highest latency recorded in the current 10 s window of wall-clock time and the one before it (the last 10 to 20 s; 0 when nothing was written); same measure as the histogram.",
        ) {
            w.sample(name, &[], &seconds(window.max_at(now_ns)));
        }
    }
    if !s.prefixes.is_empty() {
        let name = "lanpush_prefix_ingest_to_write_seconds";
        if w.family(name, "histogram", INGEST_HELP) {
            for (prefix, p) in &s.prefixes {
                histogram_samples(w, name, &[("prefix", prefix)], &p.ingest_to_write);
            }
        }
        let name = "lanpush_prefix_source_to_write_seconds";
        if w.family(name, "histogram", SOURCE_HELP) {
            for (prefix, p) in &s.prefixes {
                histogram_samples(w, name, &[("prefix", prefix)], &p.source_to_write);
            }
        }
    }
    let name = "lanpush_latency_saturated_total";
    if w.family(
        name,
        "counter",
        "Latencies above metrics.histogram_max_ms, recorded as that maximum.",
    ) {
        w.sample(name, &[], &s.saturated.to_string());
    }
    let name = "lanpush_source_ahead_total";
    if w.family(
        name,
        "counter",
        "Frames whose source timestamp was later than their write (clock skew), not recorded.",
    ) {
        w.sample(name, &[], &s.source_ahead.to_string());
    }
}

/// One histogram's series: cumulative `_bucket{le}` counts in seconds for
/// [`LATENCY_BUCKETS_US`] and `+Inf`, `_sum`, `_count`.
fn histogram_samples<T: hdrhistogram::Counter>(
    w: &mut Writer,
    name: &str,
    labels: &[(&str, &str)],
    histogram: &hdrhistogram::Histogram<T>,
) {
    let bucket = format!("{name}_bucket");
    let count = histogram.len();
    for bound_us in LATENCY_BUCKETS_US {
        let le = seconds(bound_us);
        let mut with_le = labels.to_vec();
        with_le.push(("le", &le));
        // Values up to the bound, in HdrHistogram's resolution (3 significant digits).
        let below = if count == 0 {
            0
        } else {
            histogram.count_between(0, bound_us).min(count)
        };
        w.sample(&bucket, &with_le, &below.to_string());
    }
    let mut with_le = labels.to_vec();
    with_le.push(("le", "+Inf"));
    w.sample(&bucket, &with_le, &count.to_string());
    let sum_s = if count == 0 {
        0.0
    } else {
        histogram.mean() * count as f64 / 1e6
    };
    w.sample(&format!("{name}_sum"), labels, &float(sum_s));
    w.sample(&format!("{name}_count"), labels, &count.to_string());
}

/// The family name and type of an engine figure.
fn engine_name(prefix: &str, key: &str) -> (String, &'static str) {
    let base: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if GAUGES.contains(&key) {
        (format!("{prefix}{base}"), "gauge")
    } else if base.ends_with("_total") {
        (format!("{prefix}{base}"), "counter")
    } else {
        (format!("{prefix}{base}_total"), "counter")
    }
}

/// A JSON number as a sample value; `None` for anything else.
fn number(value: &Value) -> Option<String> {
    if let Some(u) = value.as_u64() {
        Some(u.to_string())
    } else if let Some(i) = value.as_i64() {
        Some(i.to_string())
    } else {
        value.as_f64().map(float)
    }
}

fn seconds(us: u64) -> String {
    float(us as f64 / 1e6)
}

/// A float as the format spells it (Go's ParseFloat: `NaN`, `+Inf`, `-Inf`, decimal).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Display never uses an exponent and round-trips exactly.
        format!("{v}")
    }
}

fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
#[path = "prometheus_tests.rs"]
mod tests;

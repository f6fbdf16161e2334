//! The output is checked line by line against the grammar of the text format 0.0.4, so a
//! format slip (a bad name, an unescaped label, a family split in two) fails here rather than
//! in a scraper.

use std::collections::{HashMap, HashSet};

use serde_json::json;

use super::*;
use crate::config::MetricsConfig;
use crate::metrics::ShardMetrics;

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample value as Go's ParseFloat reads it, restricted to what exporters write.
fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => return Ok(f64::NAN),
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |d: &str| d.chars().all(|c| c.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || !exponent_ok {
        return Err(format!("bad value {s:?}"));
    }
    s.parse().map_err(|e| format!("bad value {s:?}: {e}"))
}

/// Parses `{a="x",b="y"} rest` and returns the labels and `rest`.
type Labels = Vec<(String, String)>;

fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("labels start with {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("raw newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.iter().any(|(n, _)| n == name) {
            return Err(format!("label {name} twice"));
        }
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by ,".into());
        }
    }
}

/// Checks `text` against the exposition format and returns its samples.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    if !text.ends_with('\n') {
        return Err("the last line must end with a newline".into());
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series: HashSet<(String, Labels)> = HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(help)) => {
                    if !is_metric_name(name) || !helps.insert(name.to_string()) {
                        return Err(err("bad or repeated HELP".into()));
                    }
                    let mut chars = help.chars();
                    while let Some(c) = chars.next() {
                        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                            return Err(err("bad escape in HELP".into()));
                        }
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !is_metric_name(name) {
                        return Err(err("bad name".into()));
                    }
                    if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind) {
                        return Err(err(format!("bad type {kind}")));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some()
                        || closed.contains(name)
                    {
                        return Err(err("TYPE repeated or after its samples".into()));
                    }
                    if let Some(previous) = current.replace(name.to_string()) {
                        closed.insert(previous);
                    }
                }
                _ => {} // a plain comment
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| err(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        // The family this sample belongs to must be the one last declared.
        let family = current
            .as_deref()
            .ok_or_else(|| err("sample before any TYPE".into()))?;
        let kind = &types[family];
        let fits = match kind.as_str() {
            "summary" => {
                let has_quantile = labels.iter().any(|(k, _)| k == "quantile");
                if name == family {
                    let q = labels
                        .iter()
                        .find(|(k, _)| k == "quantile")
                        .and_then(|(_, v)| parse_value(v).ok());
                    has_quantile && q.is_some_and(|q| (0.0..=1.0).contains(&q))
                } else {
                    !has_quantile
                        && (name == format!("{family}_sum") || name == format!("{family}_count"))
                }
            }
            _ => name == family && !labels.iter().any(|(k, _)| k == "quantile" || k == "le"),
        };
        if !fits {
            return Err(err(format!("does not belong to {kind} family {family}")));
        }
        if kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(err("negative or NaN counter".into()));
        }
        let mut key = labels.clone();
        key.sort();
        if !series.insert((name.to_string(), key)) {
            return Err(err("duplicate series".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for family in types.keys() {
        if !helps.contains(family) {
            return Err(format!("{family} has no HELP"));
        }
    }
    Ok(samples)
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && s.labels.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
    })
}

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

fn snapshot() -> MetricsSnapshot {
    let mut m = ShardMetrics::new(&MetricsConfig::default());
    let t0: u64 = 1_700_000_000_000_000_000;
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
    let text = prometheus_text(&snapshot(), &stats());
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
    assert_eq!(
        find(&samples, "lanpush_open_connections", &[])
            .unwrap()
            .value,
        3.0
    );
    assert_eq!(
        find(&samples, "lanpush_uptime_seconds", &[]).unwrap().value,
        12.345
    );

    // Totals: 1001 frames, ingest -> write 1 µs .. 1000 µs, p50 about 500 µs.
    let p50 = find(
        &samples,
        "lanpush_ingest_to_write_seconds",
        &[("quantile", "0.5")],
    )
    .unwrap();
    assert!((p50.value - 0.0005).abs() < 0.000_002, "{p50:?}");
    for q in ["0.9", "0.99", "0.999", "0.9999"] {
        assert!(find(
            &samples,
            "lanpush_ingest_to_write_seconds",
            &[("quantile", q)]
        )
        .is_some());
    }
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
    // A prefix with no source timestamps: NaN quantiles, zero count.
    let q = find(
        &samples,
        "lanpush_prefix_source_to_write_seconds",
        &[("prefix", "quiet/prefix"), ("quantile", "0.99")],
    )
    .unwrap();
    assert!(q.value.is_nan());
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

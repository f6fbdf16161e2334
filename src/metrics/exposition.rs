//! A strict checker of the Prometheus text exposition format 0.0.4, for tests (the unit tests
//! of `prometheus.rs` and the real binary's `/metrics` in `tests/`): every line against the
//! grammar, one TYPE and HELP per family before its samples, no split family, no duplicate
//! series, counters named `_total`, and histograms whose buckets are cumulative and end in a
//! `+Inf` bucket equal to `_count`. A format slip fails a test rather than a scraper.

use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
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
pub fn parse_value(s: &str) -> Result<f64, String> {
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
pub type Labels = Vec<(String, String)>;

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
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
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
            "histogram" => {
                let le = labels.iter().find(|(k, _)| k == "le");
                if name == format!("{family}_bucket") {
                    le.is_some_and(|(_, v)| parse_value(v).is_ok_and(|b| !b.is_nan()))
                } else {
                    le.is_none()
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
        if kind == "counter" && !name.ends_with("_total") {
            return Err(err("a counter's name must end in _total".into()));
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
    for (family, kind) in &types {
        if kind == "histogram" {
            check_histogram(family, &samples)?;
        }
    }
    Ok(samples)
}

/// A histogram's series: per label set, buckets in increasing `le` order with cumulative
/// (non-decreasing) counts, a `+Inf` bucket equal to `_count`, and a `_sum`.
fn check_histogram(family: &str, samples: &[Sample]) -> Result<(), String> {
    let bucket = format!("{family}_bucket");
    let mut groups: Vec<(Labels, Vec<(f64, f64)>)> = Vec::new();
    for s in samples.iter().filter(|s| s.name == bucket) {
        let mut rest: Labels = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        rest.sort();
        let le = s
            .labels
            .iter()
            .find(|(k, _)| k == "le")
            .and_then(|(_, v)| parse_value(v).ok())
            .ok_or_else(|| format!("{bucket} without le"))?;
        match groups.iter_mut().find(|(l, _)| *l == rest) {
            Some((_, buckets)) => buckets.push((le, s.value)),
            None => groups.push((rest, vec![(le, s.value)])),
        }
    }
    if groups.is_empty() {
        return Err(format!("histogram {family} has no buckets"));
    }
    for (labels, buckets) in groups {
        for pair in buckets.windows(2) {
            if pair[1].0 <= pair[0].0 || pair[1].1 < pair[0].1 {
                return Err(format!(
                    "{family}{labels:?}: buckets not increasing and cumulative: {pair:?}"
                ));
            }
        }
        let Some(&(inf, total)) = buckets.last().filter(|b| b.0 == f64::INFINITY) else {
            return Err(format!("{family}{labels:?}: no +Inf bucket last"));
        };
        let with = |name: String| {
            samples.iter().find(|s| {
                let mut l = s.labels.clone();
                l.sort();
                s.name == name && l == labels
            })
        };
        let count = with(format!("{family}_count"))
            .ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
        if count.value != total || inf != f64::INFINITY {
            return Err(format!(
                "{family}{labels:?}: +Inf bucket {total} != _count {}",
                count.value
            ));
        }
        with(format!("{family}_sum")).ok_or_else(|| format!("{family}{labels:?}: no _sum"))?;
    }
    Ok(())
}

pub fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && s.labels.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
    })
}

//! The `.hgrm` percentile-distribution text, as HdrHistogram's Java
//! `AbstractHistogram.outputPercentileDistribution(out, 5, 1000.0)` writes it (5 ticks per half
//! distance, ns values scaled to microseconds), so the HdrHistogram plotter and every tool that
//! reads `.hgrm` files take it. One comment line goes first to name the unit.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Percentile ticks per half distance to 100%, as in HdrHistogram's own output.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Recorded nanoseconds per printed unit (microseconds).
pub const NS_PER_OUTPUT_UNIT: f64 = 1_000.0;

/// The sub-buckets per bucket HdrHistogram uses for `sigfig` digits (the footer reports it).
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10u64.pow(sigfig as u32)).next_power_of_two()
}

/// Renders `h` (values in ns) with `title` in the leading comment.
pub fn percentile_distribution(h: &Histogram<u64>, title: &str) -> String {
    let digits = h.sigfig() as usize;
    let scale = NS_PER_OUTPUT_UNIT;
    let mut out = String::new();
    let title = title.replace('\n', " ");
    let _ = writeln!(
        out,
        "# {title}; values in microseconds (recorded in ns, divided by 1000)"
    );
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / scale;
            let quantile = v.quantile_iterated_to();
            if quantile < 1.0 {
                let _ = writeln!(
                    out,
                    "{value:12.digits$} {quantile:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - quantile)
                );
            } else {
                let _ = writeln!(out, "{value:12.digits$} {quantile:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {max:12.digits$}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    out
}

#[cfg(test)]
pub mod parse {
    //! A reader for the format, to prove the output parses.

    /// One row: value, percentile (0..=1), total count, 1/(1-p) (None on the last row).
    #[derive(Debug, Clone, PartialEq)]
    pub struct Row {
        pub value: f64,
        pub percentile: f64,
        pub total_count: u64,
        pub inverse: Option<f64>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Parsed {
        pub rows: Vec<Row>,
        pub mean: f64,
        pub stdev: f64,
        pub max: f64,
        pub total_count: u64,
        pub buckets: u64,
        pub sub_buckets: u64,
    }

    fn footer_pair(line: &str) -> Result<(String, String), String> {
        let inner = line
            .strip_prefix("#[")
            .and_then(|l| l.strip_suffix(']'))
            .ok_or(format!("bad footer line {line:?}"))?;
        let mut values = inner.split(',').map(|part| {
            part.split('=')
                .nth(1)
                .map(|v| v.trim().to_string())
                .ok_or(format!("no '=' in {part:?}"))
        });
        let a = values.next().ok_or("empty footer")??;
        let b = values.next().ok_or("one value in footer")??;
        Ok((a, b))
    }

    pub fn parse(text: &str) -> Result<Parsed, String> {
        let mut rows = Vec::new();
        let mut footer = Vec::new();
        let mut saw_header = false;
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            if trimmed.starts_with("#[") {
                footer.push(footer_pair(trimmed)?);
                continue;
            }
            if trimmed.starts_with('#') {
                continue;
            }
            if trimmed.starts_with("Value") {
                let columns: Vec<&str> = trimmed.split_whitespace().collect();
                if columns != ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"] {
                    return Err(format!("bad header {trimmed:?}"));
                }
                saw_header = true;
                continue;
            }
            let columns: Vec<&str> = trimmed.split_whitespace().collect();
            let num = |i: usize| -> Result<f64, String> {
                columns
                    .get(i)
                    .ok_or(format!("missing column {i} in {trimmed:?}"))?
                    .parse::<f64>()
                    .map_err(|e| format!("column {i} of {trimmed:?}: {e}"))
            };
            let row = Row {
                value: num(0)?,
                percentile: num(1)?,
                total_count: columns
                    .get(2)
                    .ok_or("missing count")?
                    .parse()
                    .map_err(|e| format!("count in {trimmed:?}: {e}"))?,
                inverse: if columns.len() == 4 {
                    Some(num(3)?)
                } else {
                    None
                },
            };
            if !(3..=4).contains(&columns.len()) {
                return Err(format!("{} columns in {trimmed:?}", columns.len()));
            }
            rows.push(row);
        }
        if !saw_header {
            return Err("no header line".into());
        }
        if footer.len() != 3 {
            return Err(format!("{} footer lines, expected 3", footer.len()));
        }
        let f = |s: &str| s.parse::<f64>().map_err(|e| format!("{s:?}: {e}"));
        let u = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
        Ok(Parsed {
            rows,
            mean: f(&footer[0].0)?,
            stdev: f(&footer[0].1)?,
            max: f(&footer[1].0)?,
            total_count: u(&footer[1].1)?,
            buckets: u(&footer[2].0)?,
            sub_buckets: u(&footer[2].1)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse::parse;
    use super::*;
    use crate::recorder::new_histogram;

    fn sample() -> Histogram<u64> {
        let mut h = new_histogram();
        // A long-tailed shape: many fast, a few slow, one very slow.
        for i in 0..100_000u64 {
            h.record(20_000 + (i % 1000) * 37).unwrap();
        }
        for i in 0..100u64 {
            h.record(5_000_000 + i * 10_000).unwrap();
        }
        h.record(2_000_000_000).unwrap();
        h
    }

    #[test]
    fn output_parses_back_and_matches_the_histogram() {
        let h = sample();
        let text = percentile_distribution(&h, "lanpush-bench fanout test");
        assert!(text.starts_with("# lanpush-bench fanout test; values in microseconds"));
        let parsed = parse(&text).unwrap();
        assert!(parsed.rows.len() > 20);
        for pair in parsed.rows.windows(2) {
            assert!(pair[1].percentile >= pair[0].percentile, "{pair:?}");
            assert!(pair[1].value >= pair[0].value, "{pair:?}");
            assert!(pair[1].total_count >= pair[0].total_count, "{pair:?}");
        }
        let last = parsed.rows.last().unwrap();
        assert_eq!(last.percentile, 1.0);
        assert_eq!(last.inverse, None);
        assert_eq!(last.total_count, h.len());
        assert!(parsed.rows[..parsed.rows.len() - 1]
            .iter()
            .all(|r| r.inverse.is_some()));
        let first = &parsed.rows[0];
        assert_eq!(first.percentile, 0.0);
        assert_eq!(first.inverse, Some(1.0));
        assert_eq!(parsed.total_count, h.len());
        assert!((parsed.max - h.max() as f64 / 1000.0).abs() < 0.001);
        assert!((last.value - parsed.max).abs() < 0.001);
        assert!((parsed.mean - h.mean() / 1000.0).abs() < 0.001);
        assert!((parsed.stdev - h.stdev() / 1000.0).abs() < 0.001);
        assert_eq!(parsed.buckets, h.buckets() as u64);
        assert_eq!(parsed.sub_buckets, 2048);
    }

    /// Row layout exactly as Java's "%12.3f %2.12f %10d %14.2f".
    #[test]
    fn rows_have_the_java_layout() {
        let mut h = new_histogram();
        h.record(1_000).unwrap();
        h.record(2_000).unwrap();
        let text = percentile_distribution(&h, "t");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[2], "");
        assert_eq!(
            lines[3],
            "       1.000 0.000000000000          1           1.00"
        );
        assert_eq!(
            lines.last().unwrap(),
            &"#[Buckets =           26, SubBuckets     =         2048]"
        );
        assert!(text.contains("       2.000 1.000000000000          2\n"));
    }

    #[test]
    fn empty_histogram_still_has_header_and_footer() {
        let parsed = parse(&percentile_distribution(&new_histogram(), "empty")).unwrap();
        assert!(parsed.rows.is_empty());
        assert_eq!(parsed.total_count, 0);
    }
}

//! Latency-by-percentile charts as hand-written SVG: the x axis is `log10(1 / (1 - p))`, so 90%,
//! 99%, 99.9% ... are evenly spaced (the usual HdrHistogram plot), the y axis is latency on a log
//! scale. One `<path>` per run; axes and grid are `<line>`s.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::hgrm::TICKS_PER_HALF_DISTANCE;

const WIDTH: f64 = 960.0;
/// Height of the plot area; the picture grows below it by one legend row per run.
const PLOT_HEIGHT: f64 = 450.0;
const LEGEND_ROW: f64 = 20.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// Line colours, cycled (Okabe-Ito: distinguishable with colour blindness).
const COLOURS: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

/// One line on the chart.
pub struct Series {
    pub label: String,
    pub samples: u64,
    /// (percentile as a fraction 0..=1, latency in ns), percentile non-decreasing.
    pub points: Vec<(f64, u64)>,
}

impl Series {
    /// The histogram's percentile ticks (as in the `.hgrm` output).
    pub fn from_histogram(label: String, h: &Histogram<u64>) -> Self {
        let points = if h.is_empty() {
            Vec::new()
        } else {
            h.iter_quantiles(TICKS_PER_HALF_DISTANCE)
                .map(|v| (v.quantile_iterated_to(), v.value_iterated_to()))
                .collect()
        };
        Series {
            label,
            samples: h.len(),
            points,
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn percentile_label(nines: u32) -> String {
    match nines {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

fn latency_label(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{} µs", ns / 1e3)
    } else {
        format!("{ns} ns")
    }
}

/// Renders the chart. The x axis runs to 99.999% (or 99.9999% if a run has a million samples);
/// each line's last point (100%, the max) is drawn at the right edge.
pub fn render(title: &str, series: &[Series]) -> String {
    let most_samples = series.iter().map(|s| s.samples).max().unwrap_or(0);
    let x_max_nines: u32 = if most_samples >= 1_000_000 { 6 } else { 5 };
    let all_values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for v in all_values {
        lo = lo.min(v.max(1));
        hi = hi.max(v);
    }
    if hi == 0 {
        lo = 1_000;
        hi = 1_000_000;
    }
    let y_lo = (lo as f64).log10().floor();
    let y_hi = ((hi.max(lo + 1)) as f64).log10().ceil().max(y_lo + 1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = PLOT_HEIGHT;
    let legend_top = TOP + plot_h + BOTTOM;
    let height = legend_top + series.len() as f64 * LEGEND_ROW + 10.0;
    let x_of = |q: f64| {
        let nines = if q >= 1.0 {
            x_max_nines as f64
        } else {
            (1.0 / (1.0 - q)).log10().min(x_max_nines as f64)
        };
        LEFT + nines / x_max_nines as f64 * plot_w
    };
    let y_of = |ns: u64| {
        let v = (ns.max(1) as f64).log10().clamp(y_lo, y_hi);
        TOP + plot_h - (v - y_lo) / (y_hi - y_lo) * plot_h
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    // Vertical grid and percentile ticks.
    for nines in 0..=x_max_nines {
        let x = LEFT + nines as f64 / x_max_nines as f64 * plot_w;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 18.0,
            percentile_label(nines)
        );
    }
    // Horizontal grid at each decade of latency.
    let mut decade = y_lo;
    while decade <= y_hi + 1e-9 {
        let ns = 10f64.powf(decade);
        let y = y_of(ns as u64);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            latency_label(ns)
        );
        decade += 1.0;
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile (log scale of 1/(1-p))</text>"#,
        LEFT + plot_w / 2.0,
        TOP + plot_h + BOTTOM - 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">latency from intended send time (log scale)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut d = String::new();
        for (j, &(q, ns)) in s.points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { " L" },
                x_of(q),
                y_of(ns)
            );
        }
        let _ = writeln!(
            svg,
            r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="2"/>"#
        );
    }
    // Legend under the chart: never on top of a curve.
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let ly = legend_top + 4.0 + i as f64 * LEGEND_ROW;
        let lx = LEFT;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/>"#,
            lx + 20.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            escape(&s.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::new_histogram;

    fn histogram(scale: u64) -> Histogram<u64> {
        let mut h = new_histogram();
        for i in 1..=10_000u64 {
            h.record(i * scale).unwrap();
        }
        h
    }

    #[test]
    fn one_path_per_run_in_a_wellformed_svg() {
        let runs = [
            Series::from_histogram("lanpush <fast>".into(), &histogram(10)),
            Series::from_histogram("mqtt & friends".into(), &histogram(100)),
            Series::from_histogram("empty".into(), &new_histogram()),
        ];
        let svg = render("fanout 1→100", &runs);
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<path ").count(), 3);
        assert!(svg.contains("lanpush &lt;fast&gt;"));
        assert!(svg.contains("mqtt &amp; friends"));
        for tick in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"] {
            assert!(svg.contains(&format!(">{tick}</text>")), "tick {tick}");
        }
        // Every element is closed: self-closing or with a matching end tag.
        let opens = svg.matches("<text").count();
        assert_eq!(opens, svg.matches("</text>").count());
        assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
        for tag in ["<line", "<rect", "<path"] {
            for piece in svg.split(tag).skip(1) {
                let end = piece.find('>').unwrap();
                assert!(piece[..end].ends_with('/'), "{tag} not self-closed");
            }
        }
        // Coordinates are finite numbers.
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}

//! HDR histogram files and the latency percentile plot (SVG, written by hand).
//!
//! Files hold one histogram of latencies in microseconds, in the HdrHistogram V2 encoding
//! (readable by any HdrHistogram implementation). The plot has the classic percentile
//! axis: x = log10(1 / (1 − p)), so 90%, 99%, 99.9% and 99.99% are evenly spaced, and y =
//! latency in ms (log scale unless asked otherwise), one line per histogram.

use anyhow::Context;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::path::Path;

/// Writes `h` (µs) to `path` in the V2 encoding.
pub fn write_hdr(path: &Path, h: &Histogram<u64>) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| anyhow::anyhow!("cannot encode histogram: {e:?}"))?;
    std::fs::write(path, buf).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a histogram written by [`write_hdr`] (or any V2 / V2-deflate encoder).
pub fn read_hdr(path: &Path) -> anyhow::Result<Histogram<u64>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("{} is not an HDR histogram: {e:?}", path.display()))
}

/// One line of the plot.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Latencies in µs.
    pub hist: Histogram<u64>,
}

/// The y axis scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YScale {
    /// Logarithmic (good when lines differ by orders of magnitude).
    Log,
    /// Linear from 0.
    Linear,
}

/// Highest x: 99.99%.
const X_MAX: f64 = 4.0;
const W: f64 = 960.0;
const H: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 300.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// (x, latency ms) points of a histogram along the percentile axis.
fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    (0..=400)
        .map(|i| {
            let x = i as f64 * X_MAX / 400.0;
            let p = 1.0 - 10f64.powf(-x);
            (x, h.value_at_quantile(p) as f64 / 1000.0)
        })
        .collect()
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Renders the percentile plot of `series` as an SVG document.
pub fn render_svg(title: &str, series: &[Series], scale: YScale) -> String {
    let series: Vec<&Series> = series.iter().filter(|s| !s.hist.is_empty()).collect();
    let all: Vec<Vec<(f64, f64)>> = series.iter().map(|s| points(&s.hist)).collect();
    let max_v = all.iter().flatten().map(|p| p.1).fold(0.001f64, f64::max);
    let min_v = all
        .iter()
        .flatten()
        .map(|p| p.1)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .min(max_v);
    let (y_lo, y_hi) = match scale {
        YScale::Log => (
            10f64.powf(min_v.max(0.001).log10().floor()),
            10f64
                .powf(max_v.log10().ceil())
                .max(10f64.powf(min_v.max(0.001).log10().floor() + 1.0)),
        ),
        YScale::Linear => (0.0, nice_ceil(max_v)),
    };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / X_MAX * pw;
    let sy = |v: f64| match scale {
        YScale::Log => {
            let v = v.max(y_lo);
            TOP + ph - (v.log10() - y_lo.log10()) / (y_hi.log10() - y_lo.log10()) * ph
        }
        YScale::Linear => TOP + ph - v / y_hi * ph,
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    // X grid and labels.
    for (x, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let px = sx(x);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        H - 15.0
    );
    // Y grid and labels.
    for v in y_ticks(y_lo, y_hi, scale) {
        let py = sy(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>",
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            py + 4.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">latency (ms{})</text>"#,
        TOP + ph / 2.0,
        if scale == YScale::Log {
            ", log scale"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="black"/>"#
    );
    // Lines and legend.
    for (i, (ser, pts)) in series.iter().zip(&all).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, v)| format!("{:.1},{:.1}", sx(x), sy(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 44.0;
        let lx = LEFT + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            escape(&ser.label)
        );
        let h = &ser.hist;
        let q = |p: f64| fmt_ms(h.value_at_quantile(p) as f64 / 1000.0);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#555\" font-size=\"11\">p50 {} p99 {} p99.9 {} max {} ms</text>",
            lx + 30.0,
            ly + 20.0,
            q(0.5),
            q(0.99),
            q(0.999),
            fmt_ms(h.max() as f64 / 1000.0)
        );
    }
    if series.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no data</text>"#,
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A tick label: `0.2`, `5`, `50`, `1000`.
fn fmt_tick(v: f64) -> String {
    let rounded = (v * 1000.0).round() / 1000.0;
    format!("{rounded}")
}

fn nice_ceil(v: f64) -> f64 {
    let mag = 10f64.powf(v.max(1e-9).log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn y_ticks(lo: f64, hi: f64, scale: YScale) -> Vec<f64> {
    match scale {
        YScale::Log => {
            let mut out = Vec::new();
            let mut decade = lo;
            while decade <= hi * 1.0001 {
                for m in [1.0, 2.0, 5.0] {
                    let v = decade * m;
                    if v <= hi * 1.0001 {
                        out.push(v);
                    }
                }
                decade *= 10.0;
            }
            out
        }
        YScale::Linear => (0..=5).map(|i| hi * i as f64 / 5.0).collect(),
    }
}

/// Writes the plot of `series` to `out`.
pub fn write_svg(out: &Path, title: &str, series: &[Series], scale: YScale) -> anyhow::Result<()> {
    std::fs::write(out, render_svg(title, series, scale))
        .with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    fn hist(values: &[u64]) -> Histogram<u64> {
        let mut h = new_histogram();
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn hdr_round_trip() {
        let dir = std::env::temp_dir().join(format!("lg-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.hdr");
        let h = hist(&[100, 200, 300, 5000]);
        write_hdr(&path, &h).unwrap();
        let back = read_hdr(&path).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
        std::fs::write(dir.join("bad.hdr"), b"nope").unwrap();
        assert!(read_hdr(&dir.join("bad.hdr")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn svg_has_one_line_per_series() {
        let series = vec![
            Series {
                label: "corelay <1>".into(),
                hist: hist(&[100, 150, 200, 900]),
            },
            Series {
                label: "peer".into(),
                hist: hist(&[1000, 3000, 40_000]),
            },
            Series {
                label: "empty".into(),
                hist: new_histogram(),
            },
        ];
        for scale in [YScale::Log, YScale::Linear] {
            let svg = render_svg("delivery", &series, scale);
            assert!(svg.starts_with("<svg"));
            assert!(svg.trim_end().ends_with("</svg>"));
            assert_eq!(svg.matches("<polyline").count(), 2);
            assert!(svg.contains("corelay &lt;1&gt;"));
            assert!(svg.contains("99.99%"));
            assert!(!svg.contains("NaN"));
        }
        assert!(render_svg("x", &[], YScale::Log).contains("no data"));
    }

    #[test]
    fn ticks() {
        assert_eq!(nice_ceil(3.2), 5.0);
        assert_eq!(fmt_tick(0.5000000001), "0.5");
        assert_eq!(fmt_tick(2000.0), "2000");
        assert_eq!(nice_ceil(10.0), 10.0);
        assert_eq!(y_ticks(0.1, 10.0, YScale::Log).len(), 7);
    }
}

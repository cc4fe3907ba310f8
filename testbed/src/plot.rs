//! Line charts as SVG, written by hand (no plotting dependency), and as PNG
//! through `rsvg-convert` (Debian's librsvg2-bin).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// A line.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A horizontal reference line (a threshold, a target rate).
#[derive(Debug, Clone)]
pub struct HLine {
    pub y: f64,
    pub label: String,
    pub color: &'static str,
}

/// A shaded span of x (a phase), labelled at the top.
#[derive(Debug, Clone)]
pub struct Span {
    pub x0: f64,
    pub x1: f64,
    pub label: String,
    pub color: &'static str,
}

/// A chart: series over shaded spans with reference lines.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub hlines: Vec<HLine>,
    pub spans: Vec<Span>,
}

const W: f64 = 900.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// A tick label with as many decimals as the step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" step for about `n` ticks over `range`.
fn tick_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

impl Chart {
    fn bounds(&self) -> (f64, f64, f64) {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .chain(self.spans.iter().flat_map(|s| [s.x0, s.x1]));
        let x_max = xs.fold(1.0f64, f64::max);
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(self.hlines.iter().map(|h| h.y));
        let y_top = ys.fold(1.0f64, f64::max) * 1.1;
        let step = tick_step(y_top, 6.0);
        (x_max, (y_top / step).ceil() * step, step)
    }

    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let (x_max, y_max, y_step) = self.bounds();
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + x / x_max * pw;
        let sy = |y: f64| TOP + ph - (y / y_max).clamp(0.0, 1.0) * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
            W / 2.0,
            esc(&self.title)
        );
        for span in &self.spans {
            let (x0, x1) = (sx(span.x0), sx(span.x1));
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{ph}" fill="{}" fill-opacity="0.18"/>"#,
                (x1 - x0).max(0.0),
                span.color
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#444">{}</text>"##,
                (x0 + x1) / 2.0,
                TOP + 14.0,
                esc(&span.label)
            );
        }
        let mut y = 0.0;
        while y <= y_max + y_step / 2.0 {
            let py = sy(y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                py + 4.0,
                tick_label(y, y_step)
            );
            y += y_step;
        }
        let x_step = tick_step(x_max, 10.0);
        let mut x = 0.0;
        while x <= x_max + x_step / 2.0 {
            let px = sx(x);
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="black"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + ph,
                TOP + ph + 5.0,
                TOP + ph + 18.0,
                tick_label(x, x_step)
            );
            x += x_step;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        for h in &self.hlines {
            let py = sy(h.y);
            let _ = writeln!(
                s,
                r#"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="{}" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="{}">{}</text>"#,
                W - RIGHT,
                h.color,
                W - RIGHT - 4.0,
                py - 4.0,
                h.color,
                esc(&h.label)
            );
        }
        for (i, series) in self.series.iter().enumerate() {
            let pts: Vec<String> = series
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                series.color,
                pts.join(" ")
            );
            let ly = TOP + 30.0 + 16.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                LEFT + 10.0,
                LEFT + 30.0,
                series.color,
                LEFT + 36.0,
                ly + 4.0,
                esc(&series.name)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 16.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        s.push_str("</svg>\n");
        s
    }

    /// Writes `STEM.svg` and `STEM.png` into `dir`; the PNG needs
    /// `rsvg-convert` and its absence is an error naming the package.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<()> {
        let svg = dir.join(format!("{stem}.svg"));
        std::fs::write(&svg, self.to_svg())?;
        let png = dir.join(format!("{stem}.png"));
        let out = Command::new("rsvg-convert")
            .arg("-o")
            .arg(&png)
            .arg(&svg)
            .output()
            .map_err(|e| {
                anyhow::anyhow!(
                    "rsvg-convert: {e}: install the Debian package librsvg2-bin to get PNG plots"
                )
            })?;
        anyhow::ensure!(
            out.status.success(),
            "rsvg-convert {}: {}",
            svg.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_every_element_and_escapes_text() {
        let c = Chart {
            title: "load <&> thresholds".into(),
            x_label: "t (s)".into(),
            y_label: "kbit/s".into(),
            series: vec![Series {
                name: "link load".into(),
                color: "#1f77b4",
                points: vec![(0.0, 100.0), (1.0, 3500.0), (2.0, 7000.0)],
            }],
            hlines: vec![HLine {
                y: 3000.0,
                label: "Min_th".into(),
                color: "red",
            }],
            spans: vec![Span {
                x0: 0.0,
                x1: 1.0,
                label: "low".into(),
                color: "green",
            }],
        };
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("load &lt;&amp;&gt; thresholds"));
        assert!(svg.contains("<polyline") && svg.contains("Min_th") && svg.contains(">low<"));
        assert_eq!(tick_step(7700.0, 6.0), 2000.0);
        assert_eq!(tick_step(60.0, 10.0), 10.0);
        assert_eq!(tick_label(0.6000000001, 0.2), "0.6");
        assert_eq!(tick_label(3000.0, 1000.0), "3000");
    }
}

//! Inline SVG charts: the burn timeline (one bar per bucket, spikes in another colour with a
//! marker above) and spend-against-limit bars. No script, no external asset: the SVG is in the
//! page, each bar has a `<title>` a browser shows on hover and a screen reader reads, and the
//! figures behind each bar are in `data-` attributes for tests and scripts.
//!
//! The colours are chosen for contrast on the page's white background: at least 3:1 for chart
//! marks (WCAG 2.1, 1.4.11 non-text contrast) and 4.5:1 for text ([`contrast_ratio`] checks it).

use maud::{html, Markup};

use super::fmt_credits;

/// The page background.
pub const BACKGROUND: &str = "#ffffff";
/// Ordinary buckets.
pub const BAR: &str = "#1d4ed8";
/// Spike buckets and their markers.
pub const SPIKE: &str = "#b91c1c";
/// Axis labels and grid text.
pub const AXIS_TEXT: &str = "#374151";
/// Grid lines (decorative; not information on their own).
pub const GRID: &str = "#d1d5db";
/// A budget bar's fill below its warning level, past it, and the track behind it.
pub const BUDGET_OK: &str = "#047857";
pub const BUDGET_WARN: &str = "#b45309";
pub const BUDGET_TRACK: &str = "#e5e7eb";

/// The colours that carry information, with what they mark: each must reach 3:1 against
/// [`BACKGROUND`] (text colours 4.5:1).
pub const MARKS: [(&str, &str); 4] = [
    ("bucket", BAR),
    ("spike", SPIKE),
    ("budget", BUDGET_OK),
    ("budget past warn_at", BUDGET_WARN),
];

/// WCAG 2.1 contrast ratio of two `#rrggbb` colours (1 to 21), or `None` if one is not in
/// that form.
pub fn contrast_ratio(a: &str, b: &str) -> Option<f64> {
    let (la, lb) = (luminance(a)?, luminance(b)?);
    let (hi, lo) = if la > lb { (la, lb) } else { (lb, la) };
    Some((hi + 0.05) / (lo + 0.05))
}

/// Relative luminance of `#rrggbb` (WCAG 2.1 definition).
fn luminance(hex: &str) -> Option<f64> {
    let h = hex.strip_prefix('#')?;
    if h.len() != 6 {
        return None;
    }
    let channel = |i: usize| -> Option<f64> {
        let v = f64::from(u8::from_str_radix(h.get(i..i + 2)?, 16).ok()?) / 255.0;
        Some(if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        })
    };
    Some(0.2126 * channel(0)? + 0.7152 * channel(2)? + 0.0722 * channel(4)?)
}

/// One bucket of a timeline chart.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub start_ms: i64,
    /// `2026-11-24T10:00:00Z`.
    pub start: String,
    pub credits_milli: i64,
    pub calls: u64,
    pub spike: bool,
}

const W: f64 = 960.0;
const H: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 28.0;

/// The burn timeline: one `rect.bucket` per bucket (`.spike` on spike buckets, with a marker
/// above), a y axis in credits and the first and last bucket's time under the x axis.
pub fn timeline(buckets: &[Bucket], bucket_label: &str, caption: &str) -> Markup {
    let max = buckets
        .iter()
        .map(|b| b.credits_milli)
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let n = buckets.len().max(1) as f64;
    let slot = plot_w / n;
    let bar_w = (slot * 0.8).max(0.5);
    let y_of = |milli: i64| TOP + plot_h - plot_h * (milli as f64 / max as f64);
    let ticks = [0, max / 2, max];
    let spikes = buckets.iter().filter(|b| b.spike).count();
    html! {
        figure.chart {
            svg xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (W) " " (H) }
                role="img" aria-label=(format!("{caption}: {} buckets of {bucket_label}, {spikes} spike(s)", buckets.len()))
                data-buckets=(buckets.len()) data-bucket=(bucket_label) {
                @for t in ticks {
                    line x1=(LEFT) x2=(W - RIGHT) y1=(y_of(t)) y2=(y_of(t)) stroke=(GRID) stroke-width="1" {}
                    text x=(LEFT - 6.0) y=(y_of(t) + 4.0) text-anchor="end" font-size="11" fill=(AXIS_TEXT) { (fmt_credits(t)) }
                }
                @for (i, b) in buckets.iter().enumerate() {
                    @let x = LEFT + i as f64 * slot + (slot - bar_w) / 2.0;
                    @let y = y_of(b.credits_milli);
                    rect class=(if b.spike { "bucket spike" } else { "bucket" })
                        x=(format!("{x:.2}")) y=(format!("{y:.2}")) width=(format!("{bar_w:.2}"))
                        height=(format!("{:.2}", (TOP + plot_h - y).max(0.0)))
                        fill=(if b.spike { SPIKE } else { BAR })
                        data-start=(b.start) data-start-ms=(b.start_ms)
                        data-credits-milli=(b.credits_milli) data-calls=(b.calls) {
                        title { (b.start) ": " (fmt_credits(b.credits_milli)) " credits, " (b.calls) " calls" @if b.spike { " (spike)" } }
                    }
                    @if b.spike {
                        path class="spike-marker" d=(format!("M{:.2} {:.2} l5 -9 l-10 0 z", x + bar_w / 2.0 + 5.0 - 5.0, (y - 3.0).max(TOP)))
                            fill=(SPIKE) {}
                    }
                }
                line x1=(LEFT) x2=(W - RIGHT) y1=(TOP + plot_h) y2=(TOP + plot_h) stroke=(AXIS_TEXT) stroke-width="1" {}
                @if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
                    text x=(LEFT) y=(H - 8.0) font-size="11" fill=(AXIS_TEXT) { (first.start) }
                    text x=(W - RIGHT) y=(H - 8.0) text-anchor="end" font-size="11" fill=(AXIS_TEXT) { (last.start) }
                }
            }
            figcaption { (caption) " — one bar per " (bucket_label) " bucket (UTC)"
                @if spikes > 0 { "; " span.spike-key { "red" } " bars are spikes" } }
        }
    }
}

/// A spend-against-limit bar: `used` of `limit` milli-credits, orange once past `warn_at`
/// (a fraction).
pub fn budget_bar(label: &str, used_milli: i64, limit_milli: i64, warn_at: f64) -> Markup {
    let frac = if limit_milli > 0 {
        (used_milli as f64 / limit_milli as f64).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let warn = limit_milli <= 0 || used_milli as f64 >= warn_at * limit_milli as f64;
    let pct = if limit_milli > 0 {
        used_milli as f64 * 100.0 / limit_milli as f64
    } else {
        100.0
    };
    html! {
        svg.budget-bar xmlns="http://www.w3.org/2000/svg" viewBox="0 0 300 14" width="300" height="14"
            role="img" aria-label=(format!("{label}: {} of {} credits ({pct:.1}%)", fmt_credits(used_milli), fmt_credits(limit_milli)))
            data-used-milli=(used_milli) data-limit-milli=(limit_milli) {
            rect x="0" y="0" width="300" height="14" fill=(BUDGET_TRACK) {}
            rect.used x="0" y="0" width=(format!("{:.1}", 300.0 * frac)) height="14"
                fill=(if warn { BUDGET_WARN } else { BUDGET_OK }) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contrast_matches_wcag_examples() {
        let r = contrast_ratio("#000000", "#ffffff").unwrap();
        assert!((r - 21.0).abs() < 0.01, "{r}");
        assert!((contrast_ratio("#ffffff", "#ffffff").unwrap() - 1.0).abs() < 1e-9);
        // #767676 on white is the well-known 4.54:1 grey.
        let g = contrast_ratio("#767676", "#ffffff").unwrap();
        assert!((g - 4.54).abs() < 0.01, "{g}");
        assert_eq!(contrast_ratio("red", "#ffffff"), None);
    }

    #[test]
    fn chart_colours_reach_the_contrast_they_need() {
        for (what, c) in MARKS {
            let r = contrast_ratio(c, BACKGROUND).unwrap();
            assert!(r >= 3.0, "{what} {c}: {r:.2}:1 is below 3:1");
        }
        let t = contrast_ratio(AXIS_TEXT, BACKGROUND).unwrap();
        assert!(t >= 4.5, "axis text {t:.2}:1");
    }

    #[test]
    fn one_bar_per_bucket() {
        let buckets: Vec<Bucket> = (0..5)
            .map(|i| Bucket {
                start_ms: i * 3_600_000,
                start: format!("b{i}"),
                credits_milli: i * 1000,
                calls: 1,
                spike: i == 4,
            })
            .collect();
        let svg = timeline(&buckets, "1h", "Credits").into_string();
        assert_eq!(svg.matches("<rect class=\"bucket").count(), 5);
        assert_eq!(svg.matches("class=\"bucket spike\"").count(), 1);
        assert_eq!(svg.matches("spike-marker").count(), 1);
    }
}

//! The picture of a sweep (`scripts/sweep.py`, `ropo plot --sweep results.json`): what each
//! method wins against what it costs. Four panels, the per-token KL drift from the reference (log scale) on
//! held-out prompts on every x axis (`ropo eval --drift`), and on the y axes the held-out
//! preference accuracy and margin (the win), and the greedy answer length against the base
//! model's and the sampled distinct-2 (reward-hacking symptoms). One line per method through
//! its runs in learning-rate order; every point labelled with its learning rate.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One run of a sweep, as `scripts/sweep.py` writes it into `results.json` (`runs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRun {
    /// The method (variant) name, e.g. `ropo`, `lora`.
    pub method: String,
    /// The run's peak learning rate.
    pub learning_rate: f64,
    /// Mean per-token KL(reference || policy) on the held-out prompts, nats.
    pub drift_kl: f64,
    /// Held-out `eval/rewards/accuracies` at the end of training.
    pub eval_accuracy: f64,
    /// Held-out `eval/rewards/margins` at the end of training.
    pub eval_margins: f64,
    /// Greedy mean answer length over the base model's.
    pub length_ratio: f64,
    /// Distinct-2 of the sampled answers.
    pub distinct_2: f64,
}

/// The panels: title and the value of a run it plots.
const PANELS: [(&str, fn(&SweepRun) -> f64); 4] = [
    ("held-out rewards/accuracies", |r| r.eval_accuracy),
    ("held-out rewards/margins", |r| r.eval_margins),
    ("greedy length / base", |r| r.length_ratio),
    ("sampled distinct-2", |r| r.distinct_2),
];

/// The colours of the methods, in name order (matplotlib's tab10).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Read `results.json`'s `runs`. Errors: unreadable file, invalid JSON, a run missing a field
/// (named), no run.
pub fn read_runs(path: &Path) -> Result<Vec<SweepRun>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::input(path, None, format!("cannot read: {e}")))?;
    #[derive(Deserialize)]
    struct Results {
        runs: Vec<SweepRun>,
    }
    let r: Results = serde_json::from_str(&text).map_err(|e| Error::input(path, Some(e.line()), format!("not a sweep's results.json: {e}")))?;
    if r.runs.is_empty() {
        return Err(Error::input(path, None, "no runs"));
    }
    Ok(r.runs)
}

/// `1e-4`, `5e-4`, `2e-3`: a learning rate as a point label.
pub fn lr_label(lr: f64) -> String {
    let s = format!("{lr:.0e}");
    s.replace("e-0", "e-")
}

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("drawing the sweep: {e}"))
}

/// Draw the sweep's four panels into a PNG at `out`, atomically.
///
/// Errors: `out` not named `*.png`, a missing folder, drawing or writing the file; nothing is
/// left at `out` then.
pub fn plot_sweep(runs: &[SweepRun], out: &Path) -> Result<()> {
    if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(Error::Msg(format!("writing {}: the sweep is drawn as PNG; name the file *.png", out.display())));
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        return Err(Error::Msg(format!("writing {}: no folder {}", out.display(), dir.display())));
    }
    crate::plot::register_font();
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = out.with_file_name(format!(".{name}.tmp-{}.png", std::process::id()));
    let res = draw(runs, &tmp).and_then(|()| std::fs::rename(&tmp, out).map_err(Error::from));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::Msg(format!("writing {}: {e}", out.display())))
}

/// Drifts below this (nats per token) are drawn at it on the log axis.
const KL_FLOOR: f64 = 1e-4;

fn draw(runs: &[SweepRun], path: &Path) -> Result<()> {
    let mut methods: BTreeMap<&str, Vec<&SweepRun>> = BTreeMap::new();
    for r in runs {
        methods.entry(r.method.as_str()).or_default().push(r);
    }
    for v in methods.values_mut() {
        v.sort_by(|a, b| a.learning_rate.total_cmp(&b.learning_rate));
    }
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    for (area, (title, value)) in root.split_evenly((2, 2)).iter().zip(PANELS) {
        // drift spans decades (0.05 to 6.5 nats/token in the orca sweep): a log axis, with drifts
        // under KL_FLOOR (an identity run) drawn at it
        let kl = |r: &SweepRun| r.drift_kl.max(KL_FLOOR);
        let (lo, hi) = runs.iter().map(kl).fold((f64::INFINITY, 0.0f64), |(l, h), k| (l.min(k), h.max(k)));
        let (x0, x1) = if lo.is_finite() { (lo / 1.6, hi * 1.6) } else { (KL_FLOOR, 1.0) };
        let (y0, y1) = crate::plot::padded(runs.iter().map(value));
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 24))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("KL(reference || policy) per token on held-out prompts (log scale)")
            .x_label_formatter(&|x| format!("{x}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        for (i, (method, rs)) in methods.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pts: Vec<(f64, f64)> = rs.iter().map(|r| (kl(r), value(r))).collect();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)).point_size(5))
                .map_err(draw_err)?
                .label(*method)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
            // the label beside its point, not under the marker
            chart
                .draw_series(rs.iter().zip(&pts).map(|(r, &p)| {
                    EmptyElement::at(p) + Text::new(lr_label(r.learning_rate), (7, -16), ("sans-serif", 14).into_font().color(&colour))
                }))
                .map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            // accuracy, margin and length rise with the drift, diversity falls: the legend where
            // the points are not
            .position(if title.contains("distinct") { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::LowerRight })
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(lr_label(5e-4), "5e-4");
        assert_eq!(lr_label(2e-3), "2e-3");
        assert_eq!(lr_label(1e-6), "1e-6");
    }

    #[test]
    fn bad_results_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("results.json");
        std::fs::write(&p, "{\"runs\": [{\"method\": \"ropo\"}]}").unwrap();
        let e = read_runs(&p).unwrap_err().to_string();
        assert!(e.contains("results.json:1: not a sweep's results.json: missing field"), "{e}");
        std::fs::write(&p, "{\"runs\": []}").unwrap();
        assert!(read_runs(&p).unwrap_err().to_string().ends_with("no runs"));
    }
}

//! Training-curve PNGs from `metrics.jsonl`: loss, rewards/accuracies and rewards/margins
//! against the step, train and eval, one panel each.
//!
//! Input: one JSON object a line (the records `ropo train` appends to `metrics.jsonl`), with a
//! numeric `step` and TRL's metric names: train values under `loss`, `rewards/accuracies`,
//! `rewards/margins`; eval values under the same names prefixed `eval/` (ropo) or `eval_`
//! (TRL's `log_history`). Blank lines are ignored; records without a `step` (run summaries) are
//! skipped and counted; metrics that are `null` or not numbers are left out of the curve.
//!
//! With live diagnostics in the file (`training.diagnostic_prompts`: `eval/drift/kl`,
//! `eval/greedy/mean_length`), one more panel for each that has points ([`DIAGNOSTIC_PANELS`]).
//!
//! Output: a PNG of `PANEL_WIDTH x HEIGHT` pixels a panel ([`WIDTH`] for the three), side by side; train as a light blue
//! line (the raw values: with batches of 2 pairs they jump between 0.3 and 2.5) under its
//! smoothed curve ([`smoothed`], TensorBoard's debiased exponential moving average, weight
//! [`SMOOTHING`]), eval as a red line with dots (eval is sparse), ln 2 (the DPO loss at step 0) as a grey line
//! on the loss panel. Text uses DejaVu Sans embedded in the binary (the `dejavu` crate), so the
//! plot does not depend on the fonts of the machine. Written atomically (temporary file, then
//! rename).

use std::io::BufRead;
use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Width of one panel in pixels.
pub const PANEL_WIDTH: u32 = 600;
/// Image width in pixels with the three [`PANELS`] only.
pub const WIDTH: u32 = 3 * PANEL_WIDTH;
/// Image height in pixels.
pub const HEIGHT: u32 = 520;
/// The plotted metrics (train names), one panel each, in order.
pub const PANELS: [&str; 3] = ["loss", "rewards/accuracies", "rewards/margins"];
/// The live diagnostics' metrics (eval only, `eval/` names without the prefix), a panel each
/// when the file has them: the KL drift from the reference (nats per token) and the greedy
/// answer length (tokens) on held-out prompts.
pub const DIAGNOSTIC_PANELS: [&str; 2] = ["drift/kl", "greedy/mean_length"];

/// The smoothing weight of the train curves (TensorBoard's default, 0.6).
pub const SMOOTHING: f64 = 0.6;

/// TensorBoard's smoothing of a scalar curve: the exponential moving average
/// `last = w * last + (1 - w) * v`, started at 0 and debiased by `1 - w^k` after `k` points
/// (TensorBoard `vz_line_chart2` `resmoothDataset`), so the first point is its own value.
/// Non-finite values pass through and do not enter the average.
pub fn smoothed(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let (mut last, mut k) = (0.0, 0);
    points
        .iter()
        .map(|&(x, v)| {
            if !v.is_finite() {
                return (x, v);
            }
            last = last * weight + (1.0 - weight) * v;
            k += 1;
            (x, last / (1.0 - weight.powi(k)))
        })
        .collect()
}

/// One panel's data: `(step, value)` points, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Train points.
    pub train: Vec<(f64, f64)>,
    /// Eval points.
    pub eval: Vec<(f64, f64)>,
}

/// The curves of a metrics file: one [`Series`] per entry of [`PANELS`], in that order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// Per panel, as [`PANELS`].
    pub series: [Series; 3],
    /// Per diagnostic, as [`DIAGNOSTIC_PANELS`] (eval points only).
    pub diagnostics: [Series; 2],
    /// Records skipped because they have no `step`.
    pub skipped: usize,
}

/// Parse metrics records from `reader`; `source` names the file in errors.
///
/// Errors (`source:line: ...`): a line that is not a JSON object, a `step` that is not a
/// number; and a file with no plotted metric at all.
pub fn parse_metrics<R: BufRead>(reader: R, source: &Path) -> Result<Curves> {
    let mut c = Curves::default();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| Error::input(source, Some(i + 1), e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| Error::input(source, Some(i + 1), format!("invalid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::input(source, Some(i + 1), "expected a JSON object"))?;
        let step = match obj.get("step") {
            None => {
                c.skipped += 1;
                continue;
            }
            Some(s) => s
                .as_f64()
                .ok_or_else(|| Error::input(source, Some(i + 1), format!("field step: expected a number, got {s}")))?,
        };
        for (p, name) in PANELS.iter().enumerate() {
            if let Some(x) = obj.get(*name).and_then(|x| x.as_f64()) {
                c.series[p].train.push((step, x));
            }
            for prefix in ["eval/", "eval_"] {
                if let Some(x) = obj.get(&format!("{prefix}{name}")).and_then(|x| x.as_f64()) {
                    c.series[p].eval.push((step, x));
                }
            }
        }
        for (p, name) in DIAGNOSTIC_PANELS.iter().enumerate() {
            for prefix in ["eval/", "eval_"] {
                if let Some(x) = obj.get(&format!("{prefix}{name}")).and_then(|x| x.as_f64()) {
                    c.diagnostics[p].eval.push((step, x));
                }
            }
        }
    }
    if c.series.iter().all(|s| s.train.is_empty() && s.eval.is_empty()) {
        return Err(Error::input(
            source,
            None,
            format!("no plottable records: none has a step and one of {}", PANELS.join(", ")),
        ));
    }
    Ok(c)
}

/// Read and parse a `metrics.jsonl` file (see [`parse_metrics`]).
pub fn read_metrics(path: &Path) -> Result<Curves> {
    let f = std::fs::File::open(path).map_err(|e| Error::input(path, None, format!("cannot open: {e}")))?;
    parse_metrics(std::io::BufReader::new(f), path)
}

/// Register the embedded DejaVu Sans as plotters' `sans-serif` (once per process).
pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font compiled into the binary; failure is a build bug.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_err() {
            panic!("the embedded DejaVu Sans font could not be parsed");
        }
    });
}

/// `[lo, hi]` padded by 5% (a flat or empty range is widened so the axis is drawable).
pub(crate) fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let w = if lo.abs() > 1e-12 { lo.abs() * 0.1 } else { 0.5 };
        lo -= w;
        hi += w;
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("drawing the training curves: {e}"))
}

/// Draw `curves` into a PNG at `out` (see the module doc), atomically.
///
/// Errors: `out` not named `*.png`, a missing folder, drawing or writing the file (the path is
/// named); nothing is left at `out` then.
pub fn plot_curves(curves: &Curves, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        return Err(Error::Msg(format!("writing {}: no folder {}", out.display(), dir.display())));
    }
    if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(Error::Msg(format!("writing {}: training curves are written as PNG; name the file *.png", out.display())));
    }
    register_font();
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // keep the .png extension: the encoder picks the format from it
    let tmp = out.with_file_name(format!(".{name}.tmp-{}.png", std::process::id()));
    let res = draw(curves, &tmp).and_then(|()| std::fs::rename(&tmp, out).map_err(Error::from));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::Msg(format!("writing {}: {e}", out.display())))
}

impl Curves {
    /// The panels drawn: the three [`PANELS`], then each diagnostic that has points.
    pub fn panels(&self) -> Vec<(&'static str, &Series)> {
        let core = PANELS.iter().copied().zip(&self.series);
        let diag = DIAGNOSTIC_PANELS.iter().copied().zip(&self.diagnostics).filter(|(_, s)| !s.eval.is_empty());
        core.chain(diag).collect()
    }

    /// The image width: [`PANEL_WIDTH`] per drawn panel.
    pub fn width(&self) -> u32 {
        PANEL_WIDTH * self.panels().len() as u32
    }
}

/// A panel's caption and its x and y ranges (padded; the loss panel shows ln 2, the accuracy
/// panel 0 to 1).
fn panel_axes<'a>(name: &'a str, s: &Series) -> (&'a str, (f64, f64), (f64, f64)) {
    let all = s.train.iter().chain(&s.eval);
    let x = padded(all.clone().map(|p| p.0));
    let mut y = padded(all.map(|p| p.1).chain((name == "loss").then_some(std::f64::consts::LN_2)));
    if name == "rewards/accuracies" {
        y = (y.0.min(-0.02), y.1.max(1.02));
    }
    let caption = match name {
        "drift/kl" => "eval drift/kl (nats/token)",
        "greedy/mean_length" => "eval greedy/mean_length (tokens)",
        n => n,
    };
    (caption, x, y)
}

fn draw(curves: &Curves, path: &Path) -> Result<()> {
    let drawn = curves.panels();
    let root = BitMapBackend::new(path, (curves.width(), HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let panels = root.split_evenly((1, drawn.len()));
    for (area, (name, s)) in panels.iter().zip(drawn) {
        let (caption, (x0, x1), (y0, y1)) = panel_axes(name, s);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 26))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| if x.fract() == 0.0 { format!("{x:.0}") } else { format!("{x:.1}") })
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        if s.train.is_empty() && s.eval.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new("no data", ((x0 + x1) / 2.0, (y0 + y1) / 2.0), ("sans-serif", 22))))
                .map_err(draw_err)?;
            continue;
        }
        if name == "loss" {
            chart
                .draw_series(LineSeries::new([(x0, std::f64::consts::LN_2), (x1, std::f64::consts::LN_2)], RGBColor(150, 150, 150)))
                .map_err(draw_err)?
                .label("ln 2")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(150, 150, 150)));
        }
        let blue = RGBColor(31, 119, 180);
        let red = RGBColor(214, 39, 40);
        if !s.train.is_empty() {
            let light = RGBColor(174, 199, 232);
            chart
                .draw_series(LineSeries::new(s.train.iter().copied(), light.stroke_width(1)))
                .map_err(draw_err)?
                .label("train (raw)")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], light.stroke_width(1)));
            chart
                .draw_series(LineSeries::new(smoothed(&s.train, SMOOTHING), blue.stroke_width(2)))
                .map_err(draw_err)?
                .label("train (smoothed)")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue.stroke_width(2)));
        }
        if !s.eval.is_empty() {
            chart
                .draw_series(LineSeries::new(s.eval.iter().copied(), red.stroke_width(2)).point_size(4))
                .map_err(draw_err)?
                .label("eval")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], red.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            // loss falls, accuracies and margins rise: keep the legend off the curves' end
            .position(if name == "loss" { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::LowerRight })
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Read `metrics` and write its curves to `out` (see [`read_metrics`], [`plot_curves`]).
/// Returns the parsed curves (for the caller's summary).
pub fn plot_metrics_file(metrics: &Path, out: &Path) -> Result<Curves> {
    let c = read_metrics(metrics)?;
    plot_curves(&c, out)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_train_and_eval_records() {
        let src = "{\"step\":1,\"loss\":0.69,\"rewards/accuracies\":0.5,\"rewards/margins\":0.0}\n\
                   \n\
                   {\"step\":2,\"loss\":0.6,\"rewards/margins\":null}\n\
                   {\"step\":2,\"eval/loss\":0.65,\"eval_rewards/accuracies\":0.7}\n\
                   {\"train_runtime\":12.5}\n";
        let c = parse_metrics(src.as_bytes(), Path::new("m.jsonl")).unwrap();
        assert_eq!(c.series[0].train, vec![(1.0, 0.69), (2.0, 0.6)]);
        assert_eq!(c.series[0].eval, vec![(2.0, 0.65)]);
        assert_eq!(c.series[1].train, vec![(1.0, 0.5)]);
        assert_eq!(c.series[1].eval, vec![(2.0, 0.7)]);
        assert_eq!(c.series[2].train, vec![(1.0, 0.0)]); // null left out
        assert_eq!(c.skipped, 1);
        assert!(c.diagnostics.iter().all(|s| s.eval.is_empty()));
        assert_eq!((c.panels().len(), c.width()), (3, WIDTH));
    }

    #[test]
    fn diagnostics_get_a_panel_each_when_present() {
        let src = "{\"step\":0,\"eval/loss\":0.69,\"eval/drift/kl\":0.0,\"eval/greedy/mean_length\":40.5}\n\
                   {\"step\":1,\"loss\":0.6}\n\
                   {\"step\":5,\"eval/loss\":0.5,\"eval/drift/kl\":0.25,\"eval/greedy/mean_length\":31.0}\n";
        let c = parse_metrics(src.as_bytes(), Path::new("m.jsonl")).unwrap();
        assert_eq!(c.diagnostics[0].eval, vec![(0.0, 0.0), (5.0, 0.25)]);
        assert_eq!(c.diagnostics[1].eval, vec![(0.0, 40.5), (5.0, 31.0)]);
        let names: Vec<&str> = c.panels().iter().map(|p| p.0).collect();
        assert_eq!(names, ["loss", "rewards/accuracies", "rewards/margins", "drift/kl", "greedy/mean_length"]);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("c.png");
        plot_curves(&c, &out).unwrap();
        let (w, h) = image_size(&out);
        assert_eq!((w, h), (5 * PANEL_WIDTH, HEIGHT));
    }

    /// Width and height from a PNG's IHDR chunk.
    fn image_size(path: &Path) -> (u32, u32) {
        let b = std::fs::read(path).unwrap();
        assert!(b.starts_with(b"\x89PNG"));
        let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (be(16), be(20))
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let e = parse_metrics("{\"step\":1,\"loss\":1}\n[1]\n".as_bytes(), Path::new("m.jsonl")).unwrap_err();
        assert_eq!(e.to_string(), "m.jsonl:2: expected a JSON object");
        let e = parse_metrics("{\"step\":\"x\",\"loss\":1}\n".as_bytes(), Path::new("m.jsonl")).unwrap_err();
        assert!(e.to_string().starts_with("m.jsonl:1: field step"), "{e}");
        let e = parse_metrics("{\"step\":1\n".as_bytes(), Path::new("m.jsonl")).unwrap_err();
        assert!(e.to_string().starts_with("m.jsonl:1: invalid JSON"), "{e}");
        let e = parse_metrics("{\"step\":1,\"lr\":1}\n".as_bytes(), Path::new("m.jsonl")).unwrap_err();
        assert!(e.to_string().contains("no plottable records"), "{e}");
    }

    // An output folder that does not exist: a plain message naming the file and the folder
    // (not the PNG encoder's I/O error); a name that is not *.png: refused (the encoder would
    // write a PNG under it). Nothing written either way.
    #[test]
    fn missing_output_folder_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let c = parse_metrics("{\"step\":1,\"loss\":0.69}\n".as_bytes(), Path::new("m.jsonl")).unwrap();
        let out = tmp.path().join("nodir").join("c.png");
        let e = plot_curves(&c, &out).unwrap_err().to_string();
        assert_eq!(e, format!("writing {}: no folder {}", out.display(), tmp.path().join("nodir").display()));
        let jpg = tmp.path().join("c.jpg");
        let e = plot_curves(&c, &jpg).unwrap_err().to_string();
        assert!(e.contains("written as PNG") && !jpg.exists(), "{e}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn smoothing_is_tensorboards_debiased_ema() {
        // w = 0.6: last = 0.4 * 1 = 0.4 -> 0.4 / 0.4 = 1; then 0.6 * 0.4 + 0.4 * 3 = 1.44 -> / 0.64
        let s = smoothed(&[(1.0, 1.0), (2.0, 3.0), (3.0, f64::NAN)], 0.6);
        assert_eq!(s[0], (1.0, 1.0));
        assert!((s[1].1 - 1.44 / 0.64).abs() < 1e-15);
        assert!(s[2].1.is_nan());
        // a constant curve stays constant
        assert!(smoothed(&[(0.0, 2.0); 5], 0.6).iter().all(|p| (p.1 - 2.0).abs() < 1e-12));
    }

    #[test]
    fn padding() {
        assert_eq!(padded([1.0, 3.0].into_iter()), (0.9, 3.1));
        assert_eq!(padded([0.0].into_iter()), (-0.55, 0.55));
        assert_eq!(padded(std::iter::empty()), (0.0, 1.0));
    }
}

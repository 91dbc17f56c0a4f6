//! The evaluation report: what `ropo eval` measured, as JSON (`--out`) and as a table
//! (`base | adapted | delta`, one row per metric).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::drift::Drift;
use super::energy::EnergyReport;
use super::generation::GenerationStats;
use super::mmlu::MmluScores;
use super::preference::PreferenceMetrics;
use crate::error::{Error, Result};

/// The measurements of one model (the base, or base + adapter). Sections not asked for are
/// `None` (and absent from the JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// Preference metrics on the `--prefs` pairs (reference = the base model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
    /// Statistics of greedy generations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greedy: Option<GenerationStats>,
    /// Statistics of seeded sampled generations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled: Option<GenerationStats>,
    /// MMLU accuracy and answer log-likelihood.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmlu: Option<MmluScores>,
    /// Drift from the reference on the `--prompts` (`--drift`; 0 for the base model itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
}

/// Everything `ropo eval` measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The model source as given (`--model`).
    pub model: String,
    /// The adapter folder, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The base model's measurements (no adapter, or `--compare-base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<ModelReport>,
    /// The adapted model's measurements (with `--adapter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapted: Option<ModelReport>,
    /// Hyperspherical energy of the adapted layers, base vs adapted weights (`--energy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<EnergyReport>,
}

/// The table rows of one model: `(metric name, value)`, in a fixed order.
///
/// Names: the preference metrics under TRL's names (`loss` as `dpo_loss`),
/// `greedy/...` and `sampled/...` generation statistics, `drift/kl` and `drift/nll` (per token),
/// `mmlu/accuracy`,
/// `mmlu/logprob_correct` overall, then per subject (`mmlu/<subject>/accuracy`, ...).
pub fn metric_rows(r: &ModelReport) -> Vec<(String, f64)> {
    let mut rows = Vec::new();
    if let Some(p) = &r.preference {
        rows.extend([
            ("dpo_loss", p.loss),
            ("rewards/accuracies", p.rewards.rewards_accuracies),
            ("rewards/ties", p.rewards.rewards_ties),
            ("rewards/margins", p.rewards.rewards_margins),
            ("rewards/chosen", p.rewards.rewards_chosen),
            ("rewards/rejected", p.rewards.rewards_rejected),
            ("logps/chosen", p.rewards.logps_chosen),
            ("logps/rejected", p.rewards.logps_rejected),
        ]
        .map(|(k, v)| (k.to_string(), v)));
    }
    for (mode, g) in [("greedy", &r.greedy), ("sampled", &r.sampled)] {
        if let Some(g) = g {
            for (k, v) in [
                ("mean_length", g.mean_length),
                ("median_length", g.median_length),
                ("hit_max_new_tokens", g.hit_max_new_tokens),
                ("distinct_1", g.distinct_1),
                ("distinct_2", g.distinct_2),
                ("repeated_4gram_rate", g.repeated_4gram_rate),
            ] {
                rows.push((format!("{mode}/{k}"), v));
            }
        }
    }
    if let Some(d) = &r.drift {
        rows.push(("drift/kl".into(), d.kl));
        rows.push(("drift/nll".into(), d.nll_policy));
    }
    if let Some(m) = &r.mmlu {
        let mut push = |prefix: String, sc: &super::mmlu::Score| {
            rows.push((format!("{prefix}accuracy"), sc.accuracy));
            if let Some(a) = sc.accuracy_norm {
                rows.push((format!("{prefix}accuracy_norm"), a));
            }
            rows.push((format!("{prefix}logprob_correct"), sc.mean_logprob_correct));
        };
        push("mmlu/".into(), &m.overall);
        for (s, sc) in &m.subjects {
            push(format!("mmlu/{s}/"), sc);
        }
    }
    rows
}

/// A number for the table: 4 decimals, or 3 significant digits in scientific notation when
/// very large or very small (so a 1e-7 delta does not print as 0.0000).
pub fn fmt_value(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 || (1e-3..1e5).contains(&a) {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

impl EvalReport {
    /// The comparison table as text: one row per metric with the base value, the adapted
    /// value and their difference (adapted - base), as many of these columns as were measured;
    /// energy rows last (sum of HE over the adapted layers, and the relative change).
    pub fn table(&self) -> String {
        let base = self.base.as_ref().map(metric_rows);
        let adapted = self.adapted.as_ref().map(metric_rows);
        // row names in order of first appearance (base first, then rows only the adapted has)
        let mut names: Vec<String> = Vec::new();
        for rows in [&base, &adapted].into_iter().flatten() {
            for (k, _) in rows {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
        let get = |rows: &Option<Vec<(String, f64)>>, k: &str| {
            rows.as_ref().and_then(|r| r.iter().find(|(n, _)| n == k).map(|(_, v)| *v))
        };
        let mut lines: Vec<(String, Option<f64>, Option<f64>)> =
            names.iter().map(|k| (k.clone(), get(&base, k), get(&adapted, k))).collect();
        if let Some(e) = &self.energy {
            let b: f64 = e.layers.iter().map(|l| l.base).sum();
            let a: f64 = e.layers.iter().map(|l| l.adapted).sum();
            lines.push((format!("energy/total ({} layers)", e.layers.len()), Some(b), Some(a)));
            lines.push(("energy/mean_relative_change".into(), None, Some(e.mean_relative_change)));
            lines.push(("energy/max_abs_relative_change".into(), None, Some(e.max_abs_relative_change)));
        }
        let width = lines.iter().map(|l| l.0.len()).max().unwrap_or(6).max(6);
        let cell = |v: Option<f64>| v.map(fmt_value).unwrap_or_else(|| "-".into());
        let mut out = format!("{:<width$}  {:>12}  {:>12}  {:>12}\n", "metric", "base", "adapted", "delta");
        out.push_str(&format!("{}\n", "-".repeat(width + 42)));
        for (k, b, a) in lines {
            let d = match (b, a) {
                (Some(b), Some(a)) => Some(a - b),
                _ => None,
            };
            out.push_str(&format!("{k:<width$}  {:>12}  {:>12}  {:>12}\n", cell(b), cell(a), cell(d)));
        }
        out
    }

    /// Write the report as pretty JSON to `path`, atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self).map_err(|e| Error::Msg(format!("serialising the report: {e}")))?;
        crate::fsutil::write_atomic(path, s.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::energy::LayerEnergy;
    use crate::eval::generation::generation_stats;

    #[test]
    fn table_has_base_adapted_delta() {
        let base = ModelReport { greedy: Some(generation_stats(&[vec![1, 2, 3, 4]], 8)), ..Default::default() };
        let adapted = ModelReport { greedy: Some(generation_stats(&[vec![1, 2]], 8)), ..Default::default() };
        let rep = EvalReport {
            model: "m".into(),
            adapter: Some("a".into()),
            base: Some(base),
            adapted: Some(adapted),
            energy: Some(EnergyReport::new(vec![LayerEnergy { layer: "l".into(), base: 2.0, adapted: 2.5, relative_change: 0.25 }])),
        };
        let t = rep.table();
        let line = t.lines().find(|l| l.starts_with("greedy/mean_length")).unwrap();
        // base 4, adapted 2, delta -2
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols, ["greedy/mean_length", "4.0000", "2.0000", "-2.0000"]);
        let e = t.lines().find(|l| l.starts_with("energy/total")).unwrap();
        assert!(e.ends_with("2.0000        2.5000        0.5000"), "{e}");
        let e = t.lines().find(|l| l.starts_with("energy/mean_relative_change")).unwrap();
        assert_eq!(e.split_whitespace().collect::<Vec<_>>(), ["energy/mean_relative_change", "-", "0.2500", "-"]);
        // JSON round trip
        let js = serde_json::to_string(&rep).unwrap();
        assert_eq!(serde_json::from_str::<EvalReport>(&js).unwrap(), rep);
    }

    #[test]
    fn small_values_keep_their_digits() {
        assert_eq!(fmt_value(1.5e-7), "1.500e-7");
        assert_eq!(fmt_value(0.0), "0.0000");
        assert_eq!(fmt_value(-0.25), "-0.2500");
        assert_eq!(fmt_value(123456.0), "1.235e5");
    }
}

//! `ropo data inspect`: what a preference file holds once loaded and tokenized.

use std::path::{Path, PathBuf};

use super::load::{load_spec, LoadOptions};
use super::tokenize::{PairTokenizer, TokenizeOptions, TokenizedPair};
use super::{DataReport, Format};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

/// The marker printed between prompt and completion in the rendered example.
pub const BOUNDARY: &str = "\u{27ea}|\u{27eb}";

/// Percentiles of a list of token counts (nearest rank: the p-th percentile is the
/// `ceil(p/100 * n)`-th smallest value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LengthStats {
    /// Median.
    pub p50: usize,
    /// 90th percentile.
    pub p90: usize,
    /// 99th percentile.
    pub p99: usize,
    /// Largest value.
    pub max: usize,
}

impl LengthStats {
    /// Stats of `values` (all zero when empty).
    pub fn of(values: &[usize]) -> Self {
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = |p: usize| -> usize {
            if v.is_empty() {
                return 0;
            }
            let k = (p * v.len()).div_ceil(100).max(1);
            v[k - 1]
        };
        Self { p50: rank(50), p90: rank(90), p99: rank(99), max: v.last().copied().unwrap_or(0) }
    }
}

impl std::fmt::Display for LengthStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:>6}  p90 {:>6}  p99 {:>6}  max {:>6}", self.p50, self.p90, self.p99, self.max)
    }
}

/// What `inspect` found.
#[derive(Debug, Clone)]
pub struct InspectReport {
    /// The file.
    pub source: PathBuf,
    /// Its row format.
    pub format: Format,
    /// Rows read / skipped (load and tokenization), prefix mismatches, truncations.
    pub report: DataReport,
    /// Pairs left after every check and limit.
    pub pairs: usize,
    /// Prompt tokens before truncation, over every loaded row the tokenizer did not refuse.
    pub prompt: LengthStats,
    /// Chosen completion tokens before truncation.
    pub chosen: LengthStats,
    /// Rejected completion tokens before truncation.
    pub rejected: LengthStats,
    /// The limits applied.
    pub options: TokenizeOptions,
    /// The first usable pair, decoded, with [`BOUNDARY`] between prompt and completion.
    pub example: Option<String>,
}

/// Load `spec` (a file, a glob or a Hub dataset's `split`, [`load_spec`]), tokenize it with
/// `tokenizer` (and `template` instead of the model's chat template when given), and summarise.
///
/// Errors: as [`load_spec`] and [`PairTokenizer::encode`]; a decoding error of the example.
pub fn inspect(
    spec: &str,
    split: &str,
    tokenizer: &Tokenizer,
    template: Option<&str>,
    load_opts: &LoadOptions,
    options: TokenizeOptions,
) -> Result<InspectReport> {
    let loaded = load_spec(spec, split, load_opts)?;
    let path = loaded.source.as_path();
    let tok = PairTokenizer::new(tokenizer, template, options)?.with_on_identical(load_opts.on_identical);
    let mut report = loaded.report.clone();
    tok.check_template(&loaded.examples, path)?;
    let (mut prompt, mut chosen, mut rejected) = (Vec::new(), Vec::new(), Vec::new());
    let mut kept: Vec<TokenizedPair> = Vec::new();
    for ex in &loaded.examples {
        let e = match tok.encode(ex, path)? {
            Ok(e) => e,
            Err(reason) => {
                report.skip(reason, ex.line);
                continue;
            }
        };
        if !e.prompt_is_prefix {
            report.prompt_mismatch.add(ex.line);
        }
        prompt.push(e.prompt_ids.len());
        chosen.push(e.chosen_ids.len());
        rejected.push(e.rejected_ids.len());
        if let Some(t) = tok.truncate(ex.line, e, path, &mut report)? {
            kept.push(t);
        }
    }
    let example = kept.first().map(|t| render_example(tokenizer, t, path)).transpose()?;
    Ok(InspectReport {
        source: path.to_path_buf(),
        format: loaded.format,
        report,
        pairs: kept.len(),
        prompt: LengthStats::of(&prompt),
        chosen: LengthStats::of(&chosen),
        rejected: LengthStats::of(&rejected),
        options,
        example,
    })
}

/// The pair decoded (special tokens kept): prompt, [`BOUNDARY`], chosen; then the same for rejected.
pub fn render_example(tokenizer: &Tokenizer, t: &TokenizedPair, source: &Path) -> Result<String> {
    let dec = |ids: &[u32]| {
        tokenizer.inner.decode(ids, false).map_err(|e| Error::input(source, Some(t.line), format!("decoding: {e}")))
    };
    let prompt = dec(&t.prompt_ids)?;
    Ok(format!(
        "--- chosen (line {line}) ---\n{prompt}{BOUNDARY}{c}\n--- rejected ---\n{prompt}{BOUNDARY}{r}\n",
        line = t.line,
        c = dec(&t.chosen_ids)?,
        r = dec(&t.rejected_ids)?,
    ))
}

impl std::fmt::Display for InspectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lim = |v: Option<usize>| v.map_or("none".to_string(), |n| n.to_string());
        writeln!(f, "file: {}", self.source.display())?;
        writeln!(f, "format: {}", self.format)?;
        write!(f, "{}", self.report)?;
        writeln!(
            f,
            "pairs kept: {} (max_length {}, max_prompt_length {})",
            self.pairs,
            lim(self.options.max_length),
            lim(self.options.max_prompt_length)
        )?;
        writeln!(f, "token lengths before truncation:")?;
        writeln!(f, "  prompt    {}", self.prompt)?;
        writeln!(f, "  chosen    {}", self.chosen)?;
        writeln!(f, "  rejected  {}", self.rejected)?;
        if let Some(ex) = &self.example {
            writeln!(f, "example ({BOUNDARY} marks where the completion starts):")?;
            write!(f, "{ex}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<usize> = (1..=100).collect();
        assert_eq!(LengthStats::of(&v), LengthStats { p50: 50, p90: 90, p99: 99, max: 100 });
        assert_eq!(LengthStats::of(&[7]), LengthStats { p50: 7, p90: 7, p99: 7, max: 7 });
        assert_eq!(LengthStats::of(&[3, 1, 2]), LengthStats { p50: 2, p90: 3, p99: 3, max: 3 });
        assert_eq!(LengthStats::of(&[]), LengthStats::default());
    }
}

//! From the run config's `[data]` table ([`DataSection`], defined here so that data needs
//! nothing of the config module) to tokenized training and evaluation splits: the data files
//! read and their rows split ([`read_rows`], no model needed, so bad files fail fast),
//! then every split tokenized with the model's tokenizer ([`tokenize_splits`]). `ropo train`
//! goes this way; `ropo eval` and `ropo data inspect` read one file with [`super::prepare`],
//! the same load and tokenization for a single file.

use serde::{Deserialize, Serialize};

use super::tokenize::{PairTokenizer, TokenizeOptions, TokenizedPair};
use super::{load, sources, DataReport, FormatChoice, LoadOptions, Loaded, OnIdentical, PreferenceExample};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

/// `[data]` of the run config (`crate::config::RunConfig`): the files, the splits, the row
/// format, the tokenization limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training files, read in this order: paths (`.jsonl`, `.json`, optionally `.gz`, or
    /// `.parquet`), shell globs (`data/*.parquet`, sorted) or Hub datasets
    /// (`hf://datasets/ORG/NAME[@REVISION]`, their `split` files) (see `ropo::data::sources`).
    pub train_files: Vec<String>,
    /// A separate evaluation file (path, glob or Hub dataset: its `eval_split_name` split). Unset:
    /// evaluation rows come from `eval_split_name`, `eval_rows` or `eval_split`, or there is no
    /// evaluation.
    pub eval_file: Option<String>,
    /// The split of the Hub datasets in `train_files` (TRL's `dataset_train_split`).
    pub split: String,
    /// A split of the same Hub datasets to evaluate on (TRL's `dataset_test_split`), or of the
    /// Hub dataset in `eval_file`. Unset: none.
    pub eval_split_name: Option<String>,
    /// Fraction of the training rows held out for evaluation (the last ones), in (0, 1).
    pub eval_split: Option<f64>,
    /// Row format, or `"auto"` to detect it per file.
    pub format: FormatChoice,
    /// Longest prompt + completion, in tokens (TRL `max_length`).
    pub max_length: usize,
    /// Longest prompt, in tokens (TRL `max_prompt_length`); unset: only `max_length` applies.
    pub max_prompt_length: Option<usize>,
    /// A chat template overriding the model's: a file path, or the template itself (a value
    /// holding `{%` or `{{` is taken as the template).
    pub chat_template: Option<String>,
    /// Rows of the training files to train on, as a Python slice (`":200"`, `"100:300"`).
    pub train_rows: Option<RowSlice>,
    /// Rows for evaluation, as a Python slice (`"-84:"` = the last 84), of `eval_file` when set,
    /// else of the training files.
    pub eval_rows: Option<RowSlice>,
    /// What to do with a pair whose chosen and rejected are identical.
    pub on_identical: OnIdentical,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train_files: Vec::new(),
            eval_file: None,
            split: "train".into(),
            eval_split_name: None,
            eval_split: None,
            format: FormatChoice::Auto,
            max_length: 1024,
            max_prompt_length: None,
            chat_template: None,
            train_rows: None,
            eval_rows: None,
            on_identical: OnIdentical::Skip,
        }
    }
}

/// Where a chat template override comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A file holding the template.
    File(std::path::PathBuf),
    /// The template text itself.
    Inline(String),
}

impl DataSection {
    /// The chat template override: inline when the value holds `{%` or `{{`, else a file path.
    pub fn chat_template_source(&self) -> Option<TemplateSource> {
        self.chat_template.as_ref().map(|c| {
            if c.contains("{%") || c.contains("{{") {
                TemplateSource::Inline(c.clone())
            } else {
                TemplateSource::File(c.into())
            }
        })
    }
}

/// A Python-style slice of rows, `start:end` (half open; negative counts from the end; either
/// side may be empty). Written as a string in TOML: `":200"`, `"-84:"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RowSlice {
    /// First row (negative: from the end); `None` = 0.
    pub start: Option<i64>,
    /// One past the last row (negative: from the end); `None` = all.
    pub end: Option<i64>,
}

impl RowSlice {
    /// The rows of a list of `len` rows, as Python's `rows[start:end]` (clamped; may be empty).
    pub fn resolve(&self, len: usize) -> std::ops::Range<usize> {
        let n = len as i64;
        let fix = |i: i64| if i < 0 { (n + i).max(0) } else { i.min(n) };
        let s = self.start.map(fix).unwrap_or(0);
        let e = self.end.map(fix).unwrap_or(n);
        (s as usize)..(e.max(s) as usize)
    }
}

impl TryFrom<String> for RowSlice {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        let bad = || format!("invalid row slice {s:?}: expected \"start:end\" like \":200\", \"-84:\" or \"10:20\"");
        let (a, b) = s.split_once(':').ok_or_else(bad)?;
        let side = |x: &str| -> std::result::Result<Option<i64>, String> {
            let x = x.trim();
            if x.is_empty() {
                Ok(None)
            } else {
                x.parse::<i64>().map(Some).map_err(|_| bad())
            }
        };
        Ok(RowSlice { start: side(a)?, end: side(b)? })
    }
}

impl From<RowSlice> for String {
    fn from(r: RowSlice) -> String {
        let f = |x: Option<i64>| x.map(|v| v.to_string()).unwrap_or_default();
        format!("{}:{}", f(r.start), f(r.end))
    }
}

/// Rows read from the data files, before tokenization (no model needed: bad files fail fast).
#[derive(Debug)]
pub struct Rows {
    /// Every file read (train files first, then the eval file), with its load report.
    pub files: Vec<Loaded>,
    /// `(index into files, example)` of the training rows, in file order.
    pub train: Vec<(usize, PreferenceExample)>,
    /// The evaluation rows.
    pub eval: Vec<(usize, PreferenceExample)>,
}

fn slice<T: Clone>(v: &[T], s: Option<RowSlice>) -> Vec<T> {
    match s {
        Some(s) => v[s.resolve(v.len())].to_vec(),
        None => v.to_vec(),
    }
}

/// Load every file of `specs` (resolved with `split`, [`sources::resolve`]) into `files`; the
/// usable rows, as `(index into files, example)`, in order.
fn load_specs<'a>(
    specs: impl IntoIterator<Item = &'a String>,
    split: &str,
    opts: &LoadOptions,
    files: &mut Vec<Loaded>,
) -> Result<Vec<(usize, PreferenceExample)>> {
    let mut rows = Vec::new();
    for spec in specs {
        for path in sources::resolve(spec, split)? {
            let loaded = load(&path, opts)?;
            rows.extend(loaded.examples.iter().cloned().map(|e| (files.len(), e)));
            files.push(loaded);
        }
    }
    Ok(rows)
}

/// Read the data files of `d` and split the rows.
///
/// Row slices index the usable rows of the concatenated train files (rows dropped while loading,
/// e.g. identical chosen/rejected, are counted and not indexed). Evaluation rows: `eval_file`
/// (sliced by `eval_rows`), else the `eval_split_name` split of the Hub datasets of
/// `train_files` (sliced by `eval_rows`), else `eval_rows` of the train files, else the last
/// `eval_split` fraction (rounded, at least 1) of the training rows, which are then left out of
/// training.
///
/// Errors: a missing or malformed file (named, with its line or row), a Hub dataset that cannot be
/// resolved ([`super::hub::resolve`]), `eval_split_name` with no Hub dataset to take it from.
pub fn read_rows(d: &DataSection) -> Result<Rows> {
    let opts = LoadOptions { format: d.format.fixed(), on_identical: d.on_identical };
    let mut files = Vec::new();
    let all = load_specs(&d.train_files, &d.split, &opts, &mut files)?;
    let hub_train: Vec<&String> = d.train_files.iter().filter(|f| f.starts_with(super::hub::PREFIX)).collect();
    let (train, eval) = if let Some(ef) = &d.eval_file {
        let split = match (&d.eval_split_name, ef.starts_with(super::hub::PREFIX)) {
            (Some(s), true) => s.as_str(),
            (None, true) => return Err(Error::Config(format!("data.eval_file {ef:?} is a Hub dataset: name its split with data.eval_split_name"))),
            (Some(_), false) => return Err(Error::Config(format!("data.eval_split_name names a split of a Hub dataset, but data.eval_file {ef:?} is not one"))),
            (None, false) => "",
        };
        let ev = load_specs([ef], split, &opts, &mut files)?;
        (slice(&all, d.train_rows), slice(&ev, d.eval_rows))
    } else if let Some(split) = &d.eval_split_name {
        if hub_train.is_empty() {
            return Err(Error::Config(format!(
                "data.eval_split_name = {split:?} names a split of the Hub datasets in data.train_files, but none is one (hf://datasets/ORG/NAME)"
            )));
        }
        let ev = load_specs(hub_train, split, &opts, &mut files)?;
        (slice(&all, d.train_rows), slice(&ev, d.eval_rows))
    } else if d.eval_rows.is_some() {
        (slice(&all, d.train_rows), slice(&all, d.eval_rows))
    } else if let Some(frac) = d.eval_split {
        let base = slice(&all, d.train_rows);
        let n_eval = ((base.len() as f64 * frac).round() as usize).clamp(1, base.len().saturating_sub(1).max(1));
        let cut = base.len().saturating_sub(n_eval);
        (base[..cut].to_vec(), base[cut..].to_vec())
    } else {
        (slice(&all, d.train_rows), Vec::new())
    };
    if train.is_empty() {
        let read: usize = files.iter().map(|f| f.report.rows_read).sum();
        let mut why: Vec<String> = Vec::new();
        for f in &files {
            why.extend(f.report.skipped.iter().map(|(reason, c)| format!("{}: {reason}: {c}", f.source.display())));
        }
        let rows = d.train_rows.map(|r| format!(" with data.train_rows = {:?}", String::from(r))).unwrap_or_default();
        let why = if why.is_empty() { String::new() } else { format!("; skipped: {}", why.join(", ")) };
        return Err(Error::Config(format!("no training rows: data.train_files {:?}{rows} select none ({read} rows read{why})", d.train_files)));
    }
    Ok(Rows { files, train, eval })
}

/// Tokenized training and evaluation pairs with their reports.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Training pairs, in file order.
    pub train: Vec<TokenizedPair>,
    /// Evaluation pairs, in file order.
    pub eval: Vec<TokenizedPair>,
    /// Rows of the training split and what tokenization dropped or cut.
    pub train_report: DataReport,
    /// Same for the evaluation split.
    pub eval_report: DataReport,
}

/// The chat template override of `d` (file contents or inline source). Errors: unreadable file.
pub fn template_override(d: &DataSection) -> Result<Option<String>> {
    match d.chat_template_source() {
        None => Ok(None),
        Some(TemplateSource::Inline(s)) => Ok(Some(s)),
        Some(TemplateSource::File(p)) => {
            std::fs::read_to_string(&p).map(Some).map_err(|e| Error::input(&p, None, format!("data.chat_template: {e}")))
        }
    }
}

/// The tokenization settings of `d`.
pub fn tokenize_options(d: &DataSection) -> TokenizeOptions {
    TokenizeOptions { max_length: Some(d.max_length), max_prompt_length: d.max_prompt_length }
}

fn tokenize_rows(pt: &PairTokenizer, files: &[Loaded], rows: &[(usize, PreferenceExample)], report: &mut DataReport) -> Result<Vec<TokenizedPair>> {
    report.rows_read += rows.len();
    let mut out = Vec::with_capacity(rows.len());
    let mut i = 0;
    while i < rows.len() {
        let f = rows[i].0;
        let j = rows[i..].iter().position(|(g, _)| *g != f).map_or(rows.len(), |k| i + k);
        let ex: Vec<PreferenceExample> = rows[i..j].iter().map(|(_, e)| e.clone()).collect();
        out.extend(pt.tokenize_all(&ex, &files[f].source, report)?);
        i = j;
    }
    Ok(out)
}

/// Tokenize the rows with the model's tokenizer (and the template override).
///
/// Errors: tokenization errors (named `file:line`), no training pair left.
pub fn tokenize_splits(d: &DataSection, rows: &Rows, tokenizer: &Tokenizer) -> Result<Splits> {
    let template = template_override(d)?;
    let mut pt = PairTokenizer::new(tokenizer, template.as_deref(), tokenize_options(d))?.with_on_identical(d.on_identical);
    if let Some(TemplateSource::File(p)) = d.chat_template_source() {
        pt = pt.with_template_name(format!("the chat template {}", p.display()));
    }
    let mut train_report = DataReport::default();
    let mut eval_report = DataReport::default();
    let train = tokenize_rows(&pt, &rows.files, &rows.train, &mut train_report)?;
    let eval = tokenize_rows(&pt, &rows.files, &rows.eval, &mut eval_report)?;
    if train.is_empty() {
        return Err(Error::Config(format!(
            "no training pair left after tokenization ({} rows, all skipped; data.max_length = {})",
            rows.train.len(),
            d.max_length
        )));
    }
    Ok(Splits { train, eval, train_report, eval_report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_select_rows() {
        let v: Vec<usize> = (0..10).collect();
        assert_eq!(slice(&v, Some(RowSlice { start: None, end: Some(3) })), vec![0, 1, 2]);
        assert_eq!(slice(&v, Some(RowSlice { start: Some(-2), end: None })), vec![8, 9]);
        assert_eq!(slice(&v, None), v);
    }
}

//! From the run config's `[data]` table to tokenized training and evaluation splits: the data
//! files read and their rows split ([`read_rows`], no model needed, so bad files fail fast),
//! then every split tokenized with the model's tokenizer ([`tokenize_splits`]). `ropo train`
//! goes this way; `ropo eval` and `ropo data inspect` read one file with [`super::prepare`],
//! the same load and tokenization for a single file.

use crate::config::{DataSection, RowSlice, TemplateSource};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

use super::tokenize::{PairTokenizer, TokenizeOptions, TokenizedPair};
use super::{load, DataReport, LoadOptions, Loaded, PreferenceExample};


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

/// Read the data files of `d` and split the rows.
///
/// Row slices index the usable rows of the concatenated train files (rows dropped while loading,
/// e.g. identical chosen/rejected, are counted and not indexed). Evaluation rows: `eval_file`
/// (sliced by `eval_rows`), else `eval_rows` of the train files, else the last `eval_split`
/// fraction (rounded, at least 1) of the training rows, which are then left out of training.
///
/// Errors: a missing or malformed file (named, with its line).
pub fn read_rows(d: &DataSection) -> Result<Rows> {
        let opts = LoadOptions { format: d.format.fixed(), on_identical: d.on_identical };
    let mut files = Vec::new();
    let mut all = Vec::new();
    for f in &d.train_files {
        let loaded = load(f, &opts)?;
        all.extend(loaded.examples.iter().cloned().map(|e| (files.len(), e)));
        files.push(loaded);
    }
    let (train, eval) = if let Some(ef) = &d.eval_file {
        let loaded = load(ef, &opts)?;
        let ev: Vec<_> = loaded.examples.iter().cloned().map(|e| (files.len(), e)).collect();
        files.push(loaded);
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

//! Knowledge retention: MMLU-style multiple choice, scored by the log-likelihood of the
//! answer letter.
//!
//! Data (Hendrycks et al. 2021, "Measuring Massive Multitask Language Understanding", ICLR;
//! github hendrycks/test at 785eba57, `../shared/data/mmlu`): one CSV per subject and split,
//! `DIR/{dev,val,test}/<subject>_<split>.csv`, no header, six fields
//! `question,A,B,C,D,answer` with RFC-4180 quoting (fields may hold commas, quotes, newlines),
//! `answer` one of `A B C D`.
//!
//! Prompt (as hendrycks/test `evaluate.py` builds it, `gen_prompt` + `format_example`):
//!
//! ```text
//! The following are multiple choice questions (with answers) about abstract algebra.\n\n
//! {dev q1}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: B\n\n      <- k examples from dev, in file order
//! {test q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:
//! ```
//!
//! Scoring (as `evaluate.py` does with the next-token log-probs of `" A"`..`" D"`): for each
//! letter L, `log p(" L" | prompt)` = log-softmax over the whole vocabulary of the logits at the
//! prompt's last position, at the token of `" L"`. The prediction is the letter with the largest
//! log-prob (the first on ties, like `np.argmax`); the retention measure is the log-prob of the
//! correct letter (not renormalised over the four letters), which moves smoothly even when a
//! small model's accuracy sits at chance. Per subject and overall: accuracy and mean log-prob of
//! the correct letter; "overall" pools all questions (micro average, as `evaluate.py`'s
//! "Average accuracy").
//!
//! Like `evaluate.py`, a prompt longer than the model's context drops dev examples (k -> k-1)
//! until it fits ([`LetterScorer::fits`]).
//!
//! **Cloze** ([`MmluFormat::Cloze`], as the SmolLM2 / cosmopedia evaluations score small models,
//! lighteval's `mmlu_cloze_prompt`): no letters; the prompt is
//! `"The following are questions about {subject}.\nQuestion: {q}\nAnswer:"` (after `k` dev examples
//! `"Question: {q}\nAnswer: {correct text}\n\n"`), and each choice's *text* `" {choice}"` is
//! scored by its summed log-likelihood after the prompt ([`ClozeScorer`]). Accuracy: the best
//! sum; length-normalised accuracy: the best sum divided by the choice's length in characters
//! (lighteval's `loglikelihood_acc_norm`, `LogProbCharNorm`); the retention measure is the summed
//! log-likelihood of the correct text. A 135M model answers letters at chance, but its
//! likelihood of the right answer text still tells what it knows.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::llama::Model;
use crate::model::tokenizer::Tokenizer;

/// The answer letters, in field order.
pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The question text.
    pub question: String,
    /// The four choices, A to D.
    pub choices: [String; 4],
    /// Index (0..4) of the correct choice.
    pub answer: usize,
}

/// Parse MMLU CSV rows from `reader`; `source` names the file in errors.
///
/// Errors (`source:line: ...`, line of the row's start): a row without exactly 6 fields, an
/// answer that is not one of `A B C D`, invalid UTF-8, or a CSV syntax error.
pub fn parse_reader<R: Read>(reader: R, source: &Path) -> Result<Vec<Question>> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(reader);
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize);
            Error::input(source, line, format!("invalid CSV: {e}"))
        })?;
        let line = rec.position().map(|p| p.line() as usize);
        if rec.len() != 6 {
            return Err(Error::input(
                source,
                line,
                format!("expected 6 fields (question,A,B,C,D,answer), got {}", rec.len()),
            ));
        }
        let ans = rec[5].trim();
        let answer = LETTERS.iter().position(|l| *l == ans).ok_or_else(|| {
            Error::input(source, line, format!("field answer: expected one of A, B, C, D, got {ans:?}"))
        })?;
        out.push(Question {
            question: rec[0].to_string(),
            choices: [rec[1].to_string(), rec[2].to_string(), rec[3].to_string(), rec[4].to_string()],
            answer,
        });
    }
    Ok(out)
}

/// Read and parse one MMLU CSV file (see [`parse_reader`]).
pub fn load_csv(path: &Path) -> Result<Vec<Question>> {
    let f = std::fs::File::open(path).map_err(|e| Error::input(path, None, format!("cannot open: {e}")))?;
    parse_reader(std::io::BufReader::new(f), path)
}

/// A data split of the MMLU files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Few-shot examples (5 per subject).
    Dev,
    /// Validation.
    Val,
    /// Test.
    Test,
}

impl Split {
    /// The folder and file-suffix name: `dev`, `val`, `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Dev => "dev",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// The folder holding `dev/`, `val/`, `test/`: `dir` itself, or `dir/data` (the layout of the
/// hendrycks/test repository). Errors when neither holds a `test/` folder.
pub fn data_root(dir: &Path) -> Result<PathBuf> {
    for cand in [dir.to_path_buf(), dir.join("data")] {
        if cand.join("test").is_dir() {
            return Ok(cand);
        }
    }
    Err(Error::input(dir, None, "not an MMLU data folder: no test/ (or data/test/) folder inside"))
}

/// The subjects of `split` under `root` (see [`data_root`]), sorted: every
/// `<subject>_<split>.csv` in `root/<split>/`.
pub fn subjects(root: &Path, split: Split) -> Result<Vec<String>> {
    let dir = root.join(split.name());
    let suffix = format!("_{}.csv", split.name());
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::input(&dir, None, format!("cannot list: {e}")))?;
    let mut out = Vec::new();
    for ent in rd {
        let name = ent.map_err(|e| Error::input(&dir, None, e.to_string()))?.file_name();
        if let Some(s) = name.to_str().and_then(|n| n.strip_suffix(&suffix)) {
            out.push(s.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Up to 5 names of `known` close to `name`: containing it (or contained in it), or within
/// edit distance `max(2, len/3)`; nearest first.
pub fn close_matches<'a>(name: &str, known: &'a [String]) -> Vec<&'a str> {
    let limit = (name.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, &str)> = known
        .iter()
        .filter_map(|k| {
            let d = strsim::levenshtein(name, k);
            let sub = !name.is_empty() && (k.contains(name) || name.contains(k.as_str()));
            (d <= limit || sub).then_some((d, k.as_str()))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(5).map(|(_, k)| k).collect()
}

/// One subject's questions: the dev examples (for k-shot prompts) and the questions to score.
#[derive(Debug, Clone)]
pub struct SubjectData {
    /// Subject name as in the file names, e.g. `abstract_algebra`.
    pub subject: String,
    /// The dev split rows, in file order (the few-shot examples).
    pub dev: Vec<Question>,
    /// The rows scored (of the evaluated split, in file order, possibly limited).
    pub questions: Vec<Question>,
}

/// Load `subject` from `root` (see [`data_root`]): its dev rows and the rows of `split`,
/// keeping the first `limit` of the latter when given.
///
/// Errors: an unknown subject (listing close matches, or how many subjects exist), and any
/// [`load_csv`] error.
pub fn load_subject(root: &Path, subject: &str, split: Split, limit: Option<usize>) -> Result<SubjectData> {
    let known = subjects(root, split)?;
    if !known.iter().any(|k| k == subject) {
        let close = close_matches(subject, &known);
        let hint = if close.is_empty() {
            format!("{} subjects exist, e.g. {}", known.len(), known.iter().take(3).cloned().collect::<Vec<_>>().join(", "))
        } else {
            format!("did you mean: {}?", close.join(", "))
        };
        return Err(Error::input(root.join(split.name()), None, format!("unknown MMLU subject {subject:?}; {hint}")));
    }
    let file = |s: Split| root.join(s.name()).join(format!("{subject}_{}.csv", s.name()));
    let dev = load_csv(&file(Split::Dev))?;
    let mut questions = load_csv(&file(split))?;
    if let Some(n) = limit {
        questions.truncate(n);
    }
    Ok(SubjectData { subject: subject.to_string(), dev, questions })
}

/// `"The following are multiple choice questions (with answers) about {subject}.\n\n"`, with
/// underscores of the subject as spaces (`evaluate.py`'s `format_subject`).
pub fn header(subject: &str) -> String {
    format!("The following are multiple choice questions (with answers) about {}.\n\n", subject.replace('_', " "))
}

/// `"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"`, followed by `" {letter}\n\n"` when
/// `with_answer` (`evaluate.py`'s `format_example`).
pub fn format_example(q: &Question, with_answer: bool) -> String {
    let mut s = q.question.clone();
    for (letter, choice) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{letter}. {choice}"));
    }
    s.push_str("\nAnswer:");
    if with_answer {
        s.push_str(&format!(" {}\n\n", LETTERS[q.answer]));
    }
    s
}

/// The full prompt for `q`: header, the first `k` dev examples with answers, then `q` without.
/// `k` larger than the number of dev rows uses them all.
pub fn build_prompt(subject: &str, dev: &[Question], k: usize, q: &Question) -> String {
    let mut s = header(subject);
    for ex in dev.iter().take(k) {
        s.push_str(&format_example(ex, true));
    }
    s.push_str(&format_example(q, false));
    s
}

/// What scoring needs from a model: the next-token log-probs of the four answer letters.
///
/// Implemented by the real model ([`ModelScorer`]) and by closures
/// `FnMut(&str) -> Result<[f64; 4]>` (which accept every prompt) in tests.
pub trait LetterScorer {
    /// `[log p(" A"|prompt), .., log p(" D"|prompt)]`: full-vocabulary log-softmax of the
    /// next-token logits after `prompt`.
    fn letter_logprobs(&mut self, prompt: &str) -> Result<[f64; 4]>;
    /// Whether `prompt` fits the model's context (dev examples are dropped until it does).
    fn fits(&mut self, _prompt: &str) -> Result<bool> {
        Ok(true)
    }
}

impl<F: FnMut(&str) -> Result<[f64; 4]>> LetterScorer for F {
    fn letter_logprobs(&mut self, prompt: &str) -> Result<[f64; 4]> {
        self(prompt)
    }
}

/// The real model as a [`LetterScorer`]: the prompt is tokenized with the tokenizer's special
/// tokens (a BOS where the model's post-processor adds one), run through the model (adapters
/// on when `use_adapters`), and only the last position goes through the LM head.
pub struct ModelScorer<'a> {
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    use_adapters: bool,
    /// Token ids of `" A"`, `" B"`, `" C"`, `" D"`.
    pub letter_ids: [u32; 4],
    /// Longest prompt in tokens.
    pub max_tokens: usize,
    /// The last prompt tokenized, to avoid encoding it twice (`fits` then `letter_logprobs`).
    last: Option<(String, Vec<u32>)>,
}

impl<'a> ModelScorer<'a> {
    /// A scorer for `model` and `tokenizer`; prompts longer than `max_tokens` (capped at the
    /// model's `max_position_embeddings`; `None` = that) drop dev examples.
    ///
    /// Errors: a letter `" L"` that is not exactly one token for this tokenizer.
    pub fn new(model: &'a Model, tokenizer: &'a Tokenizer, use_adapters: bool, max_tokens: Option<usize>) -> Result<Self> {
        let mut letter_ids = [0u32; 4];
        for (i, l) in LETTERS.iter().enumerate() {
            let text = format!(" {l}");
            let enc = tokenizer.inner.encode(text.as_str(), false).map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
            match enc.get_ids() {
                [id] => letter_ids[i] = *id,
                ids => {
                    return Err(Error::Msg(format!(
                        "MMLU scoring needs {text:?} to be one token, but this tokenizer gives {} ({ids:?})",
                        ids.len()
                    )))
                }
            }
        }
        let ctx = model.config().max_position_embeddings;
        Ok(Self { model, tokenizer, use_adapters, letter_ids, max_tokens: max_tokens.unwrap_or(ctx).min(ctx), last: None })
    }

    fn ids(&mut self, prompt: &str) -> Result<Vec<u32>> {
        if let Some((p, ids)) = &self.last {
            if p == prompt {
                return Ok(ids.clone());
            }
        }
        let enc = self.tokenizer.inner.encode(prompt, true).map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        let ids = enc.get_ids().to_vec();
        self.last = Some((prompt.to_string(), ids.clone()));
        Ok(ids)
    }
}

impl LetterScorer for ModelScorer<'_> {
    fn letter_logprobs(&mut self, prompt: &str) -> Result<[f64; 4]> {
        let ids = self.ids(prompt)?;
        let t = ids.len();
        let input = Tensor::new(ids.as_slice(), self.model.device())?.unsqueeze(0)?; // (1, T)
        // No autograd graph: the adapters' parameters are read detached.
        let logits = crate::model::grad::no_grad(|| -> Result<Tensor> {
            let hidden = self.model.forward_hidden(&input, None, self.use_adapters)?; // (1, T, D)
            let last = hidden.narrow(1, t - 1, 1)?; // (1, 1, D)
            Ok(self.model.lm_head(&last, self.use_adapters)?.flatten_all()?) // (V,)
        })?;
        let logits = logits.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        // log-softmax in f64: l - max - ln Σ exp(l - max)
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        Ok(self.letter_ids.map(|id| logits[id as usize] - lse))
    }

    fn fits(&mut self, prompt: &str) -> Result<bool> {
        Ok(self.ids(prompt)?.len() <= self.max_tokens)
    }
}

impl ModelScorer<'_> {
    /// The ids of `continuation` after `prompt`, as lighteval splits them: the tokens of
    /// `prompt + continuation` past the prompt's own tokens, when those start it; else the
    /// continuation tokenized alone.
    fn continuation_ids(&mut self, prompt: &str, continuation: &str) -> Result<Vec<u32>> {
        let ctx = self.ids(prompt)?;
        let whole = format!("{prompt}{continuation}");
        let enc = self.tokenizer.inner.encode(whole.as_str(), true).map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        let ids = enc.get_ids();
        if ids.len() > ctx.len() && ids.starts_with(&ctx) {
            return Ok(ids[ctx.len()..].to_vec());
        }
        let enc = self.tokenizer.inner.encode(continuation, false).map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }
}

impl ClozeScorer for ModelScorer<'_> {
    /// The four `prompt + continuation` sequences in one right-padded batch (causal attention:
    /// the padding after a row does not reach its positions); only the continuation positions
    /// go through the LM head; log-softmax in f64.
    fn continuation_logprobs(&mut self, prompt: &str, continuations: &[String; 4]) -> Result<[f64; 4]> {
        let ctx = self.ids(prompt)?;
        let conts: Vec<Vec<u32>> = continuations.iter().map(|c| self.continuation_ids(prompt, c)).collect::<Result<_>>()?;
        if let Some(i) = conts.iter().position(Vec::is_empty) {
            return Err(Error::Msg(format!("MMLU cloze: choice {} tokenizes to nothing", LETTERS[i])));
        }
        let width = ctx.len() + conts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(4 * width);
        for c in &conts {
            ids.extend_from_slice(&ctx);
            ids.extend_from_slice(c);
            ids.resize(ids.len() + width - ctx.len() - c.len(), 0);
        }
        let input = Tensor::from_vec(ids, (4, width), self.model.device())?;
        let mut out = [0.0; 4];
        crate::model::grad::no_grad(|| -> Result<()> {
            let hidden = self.model.forward_hidden(&input, None, self.use_adapters)?; // (4, W, D)
            for (b, c) in conts.iter().enumerate() {
                let h = hidden.narrow(0, b, 1)?.narrow(1, ctx.len() - 1, c.len())?; // (1, C, D)
                let logits = self.model.lm_head(&h, self.use_adapters)?.squeeze(0)?.to_dtype(DType::F64)?; // (C, V)
                for (row, &y) in logits.to_vec2::<f64>()?.iter().zip(c) {
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
                    out[b] += row[y as usize] - lse;
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn fits_with(&mut self, prompt: &str, continuations: &[String; 4]) -> Result<bool> {
        let n = self.ids(prompt)?.len();
        let mut longest = 0;
        for c in continuations {
            longest = longest.max(self.continuation_ids(prompt, c)?.len());
        }
        Ok(n + longest <= self.max_tokens)
    }
}

/// Accuracy and mean log-prob of the correct answer over a set of questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Number of questions.
    pub n: usize,
    /// Share (0..=1) predicted correctly.
    pub accuracy: f64,
    /// Cloze only: share predicted correctly by log-likelihood per character of the choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_norm: Option<f64>,
    /// Mean of `log p(correct letter | prompt)`, or in cloze form of the correct answer text's
    /// summed log-likelihood (nats; 0 is certainty).
    pub mean_logprob_correct: f64,
}

/// One scored question: right by the plain score, right by the normalised one (cloze), and
/// the correct answer's log-likelihood.
type Item = (bool, Option<bool>, f64);

impl Score {
    fn from_items(items: &[Item]) -> Self {
        let n = items.len();
        let share = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        let correct = items.iter().filter(|(c, _, _)| *c).count();
        let norm: Option<usize> = items.iter().map(|(_, c, _)| c.map(usize::from)).sum();
        let lp = items.iter().map(|(_, _, l)| l).sum::<f64>();
        Score { n, accuracy: share(correct), accuracy_norm: norm.map(share), mean_logprob_correct: if n == 0 { 0.0 } else { lp / n as f64 } }
    }
}

/// How MMLU questions are put to the model (`ropo eval --mmlu-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MmluFormat {
    /// The choices listed with letters; the answer letter's next-token log-prob (hendrycks/test).
    #[default]
    Letter,
    /// No letters; each choice's text scored by its log-likelihood after the question.
    Cloze,
}

/// `"The following are questions about {subject}.\n"` (lighteval's `mmlu_cloze_prompt`).
pub fn cloze_header(subject: &str) -> String {
    format!("The following are questions about {}.\n", subject.replace('_', " "))
}

/// The cloze prompt for `q`: header, `k` dev examples `"Question: {q}\nAnswer: {text}\n\n"`,
/// then `"Question: {q}\nAnswer:"`.
pub fn build_cloze_prompt(subject: &str, dev: &[Question], k: usize, q: &Question) -> String {
    let mut s = cloze_header(subject);
    for ex in dev.iter().take(k) {
        s.push_str(&format!("Question: {}\nAnswer: {}\n\n", ex.question, ex.choices[ex.answer]));
    }
    s.push_str(&format!("Question: {}\nAnswer:", q.question));
    s
}

/// The cloze continuations of `q`: `" {choice}"`, A to D.
pub fn cloze_choices(q: &Question) -> [String; 4] {
    q.choices.clone().map(|c| format!(" {c}"))
}

/// What cloze scoring needs from a model: each continuation's summed log-likelihood.
pub trait ClozeScorer {
    /// `[Σ_t log p(c_t | prompt, c_<t)]` for each of the four continuations.
    fn continuation_logprobs(&mut self, prompt: &str, continuations: &[String; 4]) -> Result<[f64; 4]>;
    /// Whether `prompt` with its longest continuation fits the model's context.
    fn fits_with(&mut self, _prompt: &str, _continuations: &[String; 4]) -> Result<bool> {
        Ok(true)
    }
}

impl<F: FnMut(&str, &[String; 4]) -> Result<[f64; 4]>> ClozeScorer for F {
    fn continuation_logprobs(&mut self, prompt: &str, continuations: &[String; 4]) -> Result<[f64; 4]> {
        self(prompt, continuations)
    }
}

/// MMLU results: one [`Score`] per subject and the pooled one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmluScores {
    /// How the questions were asked.
    #[serde(default)]
    pub format: MmluFormat,
    /// Number of dev examples requested per prompt (a prompt may use fewer to fit).
    pub k_shot: usize,
    /// Per subject, by name.
    pub subjects: BTreeMap<String, Score>,
    /// All questions pooled (micro average).
    pub overall: Score,
}

/// Index of the largest value (the first one on ties, as `np.argmax`).
pub fn argmax(v: &[f64; 4]) -> usize {
    let mut best = 0;
    for i in 1..4 {
        if v[i] > v[best] {
            best = i;
        }
    }
    best
}

/// Score every question of `data` with `k`-shot prompts; `on_question` is called after each
/// question (for a progress bar).
///
/// Errors: the scorer's errors; a non-finite log-prob; a question that does not fit even
/// zero-shot.
pub fn score(
    data: &[SubjectData],
    k: usize,
    scorer: &mut dyn LetterScorer,
    on_question: impl FnMut(),
) -> Result<MmluScores> {
    score_with(data, k, MmluFormat::Letter, on_question, |sd, q, kk| {
        let prompt = build_prompt(&sd.subject, &sd.dev, kk, q);
        if !scorer.fits(&prompt)? {
            return Ok(None);
        }
        let lp = scorer.letter_logprobs(&prompt)?;
        Ok(Some((lp, argmax(&lp) == q.answer, None)))
    })
}

/// [`score`] in cloze form ([`MmluFormat::Cloze`]).
///
/// Errors: as [`score`].
pub fn score_cloze(data: &[SubjectData], k: usize, scorer: &mut dyn ClozeScorer, on_question: impl FnMut()) -> Result<MmluScores> {
    score_with(data, k, MmluFormat::Cloze, on_question, |sd, q, kk| {
        let prompt = build_cloze_prompt(&sd.subject, &sd.dev, kk, q);
        let conts = cloze_choices(q);
        if !scorer.fits_with(&prompt, &conts)? {
            return Ok(None);
        }
        let lp = scorer.continuation_logprobs(&prompt, &conts)?;
        let per_char: [f64; 4] = std::array::from_fn(|i| lp[i] / conts[i].chars().count().max(1) as f64);
        Ok(Some((lp, argmax(&lp) == q.answer, Some(argmax(&per_char) == q.answer))))
    })
}

/// One question asked with `kk` shots: `None` when the prompt does not fit, else the four
/// log-likelihoods and whether the plain (and normalised) prediction is right.
type Asked = Option<([f64; 4], bool, Option<bool>)>;

/// The scoring loop both formats share: shots dropped until the prompt fits, finite checks,
/// per-subject and pooled scores.
fn score_with(
    data: &[SubjectData],
    k: usize,
    format: MmluFormat,
    mut on_question: impl FnMut(),
    mut ask: impl FnMut(&SubjectData, &Question, usize) -> Result<Asked>,
) -> Result<MmluScores> {
    let mut subjects = BTreeMap::new();
    let mut all = Vec::new();
    for sd in data {
        let mut items = Vec::with_capacity(sd.questions.len());
        for (i, q) in sd.questions.iter().enumerate() {
            let mut kk = k.min(sd.dev.len());
            let (lp, right, right_norm) = loop {
                if let Some(r) = ask(sd, q, kk)? {
                    break r;
                }
                if kk == 0 {
                    return Err(Error::Msg(format!(
                        "MMLU {} question {}: the zero-shot prompt is longer than the model's context",
                        sd.subject,
                        i + 1
                    )));
                }
                kk -= 1;
            };
            if lp.iter().any(|x| !x.is_finite()) {
                return Err(Error::Msg(format!("MMLU {} question {}: non-finite log-probs {lp:?}", sd.subject, i + 1)));
            }
            items.push((right, right_norm, lp[q.answer]));
            on_question();
        }
        all.extend_from_slice(&items);
        subjects.insert(sd.subject.clone(), Score::from_items(&items));
    }
    Ok(MmluScores { format, k_shot: k, subjects, overall: Score::from_items(&all) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "What is 1+1?,1,2,3,4,B\n\"Pick, \"\"quoted\"\"\",\"x\ny\",b,c,d, A\n";

    #[test]
    fn parses_quoted_fields() {
        let qs = parse_reader(CSV.as_bytes(), Path::new("t.csv")).unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].question, "What is 1+1?");
        assert_eq!(qs[0].answer, 1);
        // comma and doubled quotes inside a quoted field, a newline inside another
        assert_eq!(qs[1].question, "Pick, \"quoted\"");
        assert_eq!(qs[1].choices[0], "x\ny");
        assert_eq!(qs[1].answer, 0);
    }

    #[test]
    fn malformed_rows_name_file_and_line() {
        // row 2 starts at line 3 (row 1 spans lines 1-2 through a quoted newline)
        let bad = "\"a\nb\",1,2,3,4,C\nq,1,2,3,4\n";
        let e = parse_reader(bad.as_bytes(), Path::new("x_test.csv")).unwrap_err().to_string();
        assert_eq!(e, "x_test.csv:3: expected 6 fields (question,A,B,C,D,answer), got 5");
        let bad = "q,1,2,3,4,E\n";
        let e = parse_reader(bad.as_bytes(), Path::new("y.csv")).unwrap_err().to_string();
        assert!(e.starts_with("y.csv:1: field answer"), "{e}");
    }

    #[test]
    fn prompt_matches_hendrycks_format() {
        let qs = parse_reader(CSV.as_bytes(), Path::new("t.csv")).unwrap();
        let p = build_prompt("high_school_math", &qs[..1], 5, &qs[0]);
        assert_eq!(
            p,
            "The following are multiple choice questions (with answers) about high school math.\n\n\
             What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n\
             What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
        );
        let p0 = build_prompt("x", &qs, 0, &qs[0]);
        assert!(p0.ends_with("about x.\n\nWhat is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"));
    }

    #[test]
    fn close_matches_rank_by_distance() {
        let known: Vec<String> = ["anatomy", "astronomy", "college_biology", "high_school_biology"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(close_matches("anatomie", &known), vec!["anatomy"]);
        assert_eq!(close_matches("biology", &known), vec!["college_biology", "high_school_biology"]);
        assert!(close_matches("zzzzzzzz", &known).is_empty());
        assert_eq!(strsim::levenshtein("kitten", "sitting"), 3);
    }

    #[test]
    fn scoring_by_hand() {
        let q = |ans| Question { question: "q".into(), choices: ["a".into(), "b".into(), "c".into(), "d".into()], answer: ans };
        let data = vec![
            SubjectData { subject: "s1".into(), dev: vec![q(0)], questions: vec![q(0), q(1)] },
            SubjectData { subject: "s2".into(), dev: vec![], questions: vec![q(2)] },
        ];
        // every prompt gets logprobs [-1, -2, -0.5, -3]: prediction C (index 2)
        let mut calls = 0;
        let mut scorer = |_: &str| -> Result<[f64; 4]> { Ok([-1.0, -2.0, -0.5, -3.0]) };
        let s = score(&data, 1, &mut scorer, || calls += 1).unwrap();
        assert_eq!(calls, 3);
        // s1: answers A, B -> both wrong; log p(correct) = -1, -2 -> mean -1.5
        assert_eq!(s.subjects["s1"], Score { n: 2, accuracy: 0.0, accuracy_norm: None, mean_logprob_correct: -1.5 });
        // s2: answer C -> right; -0.5
        assert_eq!(s.subjects["s2"], Score { n: 1, accuracy: 1.0, accuracy_norm: None, mean_logprob_correct: -0.5 });
        // pooled: 1/3 right; (-1 - 2 - 0.5) / 3
        assert_eq!(s.overall.n, 3);
        assert!((s.overall.accuracy - 1.0 / 3.0).abs() < 1e-15);
        assert!((s.overall.mean_logprob_correct - (-3.5 / 3.0)).abs() < 1e-15);
        // ties go to the first letter
        assert_eq!(argmax(&[-1.0, -1.0, -2.0, -1.0]), 0);
    }

    #[test]
    fn cloze_prompt_and_scoring_by_hand() {
        let q = |ans, text: &str| Question {
            question: format!("Q{text}?"),
            choices: ["a".into(), "bbbb".into(), "cc".into(), "d".into()],
            answer: ans,
        };
        let p = build_cloze_prompt("college_physics", &[q(1, "0")], 1, &q(0, "1"));
        assert_eq!(p, "The following are questions about college physics.\nQuestion: Q0?\nAnswer: bbbb\n\nQuestion: Q1?\nAnswer:");
        assert_eq!(cloze_choices(&q(0, "")), [" a", " bbbb", " cc", " d"].map(String::from));
        // sums [-2, -3, -2.5, -4]: plain argmax A; per character (" a" 2, " bbbb" 5, " cc" 3,
        // " d" 2 chars) [-1, -0.6, -0.833, -2]: argmax B
        let data = vec![SubjectData { subject: "s".into(), dev: vec![], questions: vec![q(0, "x"), q(1, "y")] }];
        let mut scorer = |_: &str, _: &[String; 4]| -> Result<[f64; 4]> { Ok([-2.0, -3.0, -2.5, -4.0]) };
        let s = score_cloze(&data, 0, &mut scorer, || {}).unwrap();
        assert_eq!(s.format, MmluFormat::Cloze);
        // question 1 (answer A): right, not by norm; question 2 (answer B): wrong, right by norm
        assert_eq!(s.overall, Score { n: 2, accuracy: 0.5, accuracy_norm: Some(0.5), mean_logprob_correct: (-2.0 - 3.0) / 2.0 });
        assert_eq!(s.subjects["s"], s.overall);
    }

    #[test]
    fn drops_shots_until_the_prompt_fits() {
        struct Short(Vec<usize>);
        impl LetterScorer for Short {
            fn letter_logprobs(&mut self, p: &str) -> Result<[f64; 4]> {
                self.0.push(p.matches("Answer:").count() - 1); // shots used
                Ok([0.0, -1.0, -1.0, -1.0])
            }
            fn fits(&mut self, p: &str) -> Result<bool> {
                Ok(p.matches("Answer:").count() <= 3) // at most 2 shots
            }
        }
        let q = Question { question: "q".into(), choices: ["a".into(), "b".into(), "c".into(), "d".into()], answer: 0 };
        let data = vec![SubjectData { subject: "s".into(), dev: vec![q.clone(); 5], questions: vec![q] }];
        let mut sc = Short(vec![]);
        score(&data, 5, &mut sc, || {}).unwrap();
        assert_eq!(sc.0, vec![2]);
    }
}

//! Preference data: row formats, chat templates, tokenization with completion masks, batching.
//!
//! The flow, one module a step (TRL 1.16 `DPOTrainer` semantics throughout):
//! 1. [`sources`] resolves a data spec (a path, a glob, `hf://datasets/ORG/NAME` through
//!    [`hub`]) to files; [`load`] reads `.jsonl` / `.json` (array), optionally gzip'd, into JSON
//!    rows with their line numbers (`file:line:column` on malformed JSON), and `.parquet`
//!    ([`parquet`]) into the same rows, located by row and row group.
//! 2. [`formats`]: detect the row format (per row, then per file) and normalise every row into a
//!    [`PreferenceExample`]; rows that cannot be used are counted in a [`DataReport`].
//! 3. [`tokenize`]: chat template + tokenizer -> prompt ids and chosen/rejected completion ids,
//!    truncated to `max_length` keeping the start.
//! 4. [`batch`]: a seeded length-grouped sampler and the collator producing the
//!    `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]` batch layout.
//! 5. [`inspect`]: the `ropo data inspect` summary.
//!
//! From a config to tokenized pairs: [`prepare`] loads and tokenizes one file (`ropo eval`,
//! `ropo data inspect`); [`splits`] reads the run config's `[data]` files, splits train and
//! evaluation rows and tokenizes them (`ropo train`).

pub mod batch;
pub mod formats;
pub mod hub;
pub mod inspect;
pub mod load;
pub mod parquet;
pub mod sources;
pub mod splits;
pub mod template;
pub mod tokenize;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::model::tokenizer::Tokenizer;

pub use formats::{Format, FormatChoice};
pub use load::{load, load_spec, parse_reader, LoadOptions, Loaded, OnIdentical};
pub use template::{ChatTemplate, Message};

/// A file loaded and tokenized: what `train` and `eval` batch from.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The file.
    pub source: PathBuf,
    /// Its row format.
    pub format: Format,
    /// The usable pairs, in file order.
    pub pairs: Vec<tokenize::TokenizedPair>,
    /// Rows read, skipped (loading and tokenization) and truncated.
    pub report: DataReport,
}

impl Prepared {
    /// Each pair's padded cost in tokens ([`tokenize::TokenizedPair::max_len`]), the input of
    /// [`batch::epoch_batches`].
    pub fn lengths(&self) -> Vec<usize> {
        self.pairs.iter().map(|p| p.max_len()).collect()
    }
}

/// Load `path` ([`load()`]) and tokenize every pair ([`tokenize::PairTokenizer::tokenize_all`]) with
/// `tokenizer`, `template` replacing the model's chat template when given.
///
/// Errors: as [`load()`] and [`tokenize::PairTokenizer::tokenize_all`].
pub fn prepare(
    path: &Path,
    tokenizer: &Tokenizer,
    template: Option<&str>,
    load_opts: &LoadOptions,
    options: tokenize::TokenizeOptions,
) -> Result<Prepared> {
    let loaded = load(path, load_opts)?;
    let mut report = loaded.report;
    let pt = tokenize::PairTokenizer::new(tokenizer, template, options)?.with_on_identical(load_opts.on_identical);
    let pairs = pt.tokenize_all(&loaded.examples, path, &mut report)?;
    Ok(Prepared { source: loaded.source, format: loaded.format, pairs, report })
}

/// [`prepare`] every file of a spec (a path, a glob or a Hub dataset's `split`,
/// [`sources::resolve`]), the pairs concatenated in file order; one file keeps its own source,
/// several take the spec as source and the first file's format.
///
/// Errors: as [`sources::resolve`] and [`prepare`].
pub fn prepare_spec(
    spec: &str,
    split: &str,
    tokenizer: &Tokenizer,
    template: Option<&str>,
    load_opts: &LoadOptions,
    options: tokenize::TokenizeOptions,
) -> Result<Prepared> {
    let mut all: Option<Prepared> = None;
    for path in sources::resolve(spec, split)? {
        let p = prepare(&path, tokenizer, template, load_opts, options)?;
        match all.as_mut() {
            None => all = Some(p),
            Some(a) => {
                a.pairs.extend(p.pairs);
                a.report.absorb(p.report);
                a.source = PathBuf::from(spec);
            }
        }
    }
    all.ok_or_else(|| crate::error::Error::input(spec, None, "no file"))
}

/// One preference pair, normalised from any of the supported row formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceExample {
    /// 1-based line of the row in its file (the line where the row starts for `.json` arrays).
    pub line: usize,
    /// The prompt and the two answers.
    pub pair: Pair,
}

/// The content of a preference pair: plain text (used without a chat template, as TRL does for
/// non-conversational rows) or a conversation (rendered with the model's chat template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pair {
    /// Standard / implicit-prompt text rows: `prompt + chosen` and `prompt + rejected` are the
    /// two full texts.
    Text {
        /// The prompt text, tokenized as is.
        prompt: String,
        /// The chosen continuation (appended to the prompt).
        chosen: String,
        /// The rejected continuation.
        rejected: String,
    },
    /// Conversations: the prompt messages, then the chosen (rejected) answer messages, usually a
    /// single `assistant` message.
    Chat {
        /// The conversation so far (system/user/assistant turns).
        prompt: Vec<Message>,
        /// The chosen answer turn(s).
        chosen: Vec<Message>,
        /// The rejected answer turn(s).
        rejected: Vec<Message>,
    },
}

impl Pair {
    /// True for [`Pair::Chat`] (needs a chat template).
    pub fn is_chat(&self) -> bool {
        matches!(self, Pair::Chat { .. })
    }
}

/// Why a row was left out. Every skip is counted in a [`DataReport`], never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// `chosen` is empty (or whitespace only) after taking the prompt off.
    EmptyChosen,
    /// `rejected` is empty (or whitespace only) after taking the prompt off.
    EmptyRejected,
    /// `chosen` equals `rejected` (skipped when `on_identical = skip`).
    Identical,
    /// An Anthropic HH row whose `rejected` transcript does not start with the `chosen`
    /// transcript up to its last `"\n\nAssistant:"`.
    NoSharedPrompt,
    /// The tokenized prompt alone fills `max_length` (TRL drops these: with keep-start
    /// truncation no completion token would be left).
    PromptTooLong,
    /// The tokenized prompt is longer than `max_prompt_length`.
    PromptOverMaxPromptLength,
    /// An implicit-prompt conversation whose completion (what follows the shared messages) holds
    /// a non-assistant message: the lists end in a user turn, or diverge before their final
    /// assistant turn.
    CompletionNotAssistant,
    /// A text completion holding an EOS / end-of-turn token before its end (more than the final
    /// answer: another turn, or a stray EOS).
    EosInsideCompletion,
    /// Chosen and rejected have the same ids after tokenization and truncation (e.g. they differ
    /// only past `max_length`): loss ln 2 and no gradient. Skipped when `on_identical = skip`.
    IdenticalAfterTruncation,
    /// The rendered prompt (with its generation prompt) is not the start of the rendered
    /// prompt + answer, so the prompt ids would not mark where the answer starts.
    PromptNotPrefix,
    /// No prompt token (and no BOS): the first completion token has nothing to be predicted from.
    EmptyPrompt,
    /// Message content holds special-token text and the template alters content (e.g. trims
    /// it), so the content cannot be tokenized apart from the template's own tokens.
    SpecialTokenInContent,
    /// The prompt does not start with exactly one BOS although the tokenizer adds one.
    BosNotOnce,
}

impl SkipReason {
    /// A short human-readable description, used by `inspect` and `train`.
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::EmptyChosen => "empty chosen",
            SkipReason::EmptyRejected => "empty rejected",
            SkipReason::Identical => "chosen identical to rejected",
            SkipReason::NoSharedPrompt => "chosen and rejected do not share a prompt",
            SkipReason::PromptTooLong => "prompt alone reaches max_length",
            SkipReason::PromptOverMaxPromptLength => "prompt longer than max_prompt_length",
            SkipReason::CompletionNotAssistant => "completion is not only the final assistant turn(s)",
            SkipReason::EosInsideCompletion => "EOS / end-of-turn inside the completion",
            SkipReason::IdenticalAfterTruncation => "chosen identical to rejected after tokenization and truncation",
            SkipReason::PromptNotPrefix => "rendered prompt is not the start of prompt + answer",
            SkipReason::EmptyPrompt => "empty prompt (no token before the completion)",
            SkipReason::SpecialTokenInContent => "special-token text in message content (template alters content)",
            SkipReason::BosNotOnce => "prompt does not start with exactly one BOS",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// A count of rows plus the first few of their line numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    /// How many rows.
    pub count: usize,
    /// The first [`Counted::KEEP_LINES`] line numbers, in file order.
    pub first_lines: Vec<usize>,
}

impl Counted {
    /// How many line numbers are kept.
    pub const KEEP_LINES: usize = 5;

    /// Add another count (of another file).
    pub fn absorb(&mut self, other: Counted) {
        self.count += other.count;
        let room = Self::KEEP_LINES.saturating_sub(self.first_lines.len());
        self.first_lines.extend(other.first_lines.into_iter().take(room));
    }

    /// Count one more row at `line`.
    pub fn add(&mut self, line: usize) {
        self.count += 1;
        if self.first_lines.len() < Self::KEEP_LINES {
            self.first_lines.push(line);
        }
    }
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.first_lines.iter().map(|l| l.to_string()).collect();
        let more = if self.count > self.first_lines.len() { ", ..." } else { "" };
        write!(f, "{} (lines {}{})", self.count, lines.join(", "), more)
    }
}

/// What happened to the rows of a file: how many were read, which were skipped and why, and
/// tokenization notes. Filled by [`load`] and [`tokenize`]; printed by `inspect` and `train`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataReport {
    /// Rows read from the file (non-blank JSON lines, or array elements).
    pub rows_read: usize,
    /// Rows left out, by reason (BTreeMap: a stable order).
    pub skipped: BTreeMap<SkipReason, Counted>,
    /// Rows whose tokenized prompt is not a prefix of the tokenized prompt + answer; as TRL, the
    /// prompt is then the common prefix of the three id sequences.
    pub prompt_mismatch: Counted,
    /// Rows whose prompt + chosen or prompt + rejected was cut to `max_length`.
    pub truncated: Counted,
}

impl DataReport {
    /// Count a skipped row.
    pub fn skip(&mut self, reason: SkipReason, line: usize) {
        self.skipped.entry(reason).or_default().add(line);
    }

    /// Add `other`'s counts (another file's) to these; line numbers are kept while fewer than
    /// [`Counted::KEEP_LINES`].
    pub fn absorb(&mut self, other: DataReport) {
        self.rows_read += other.rows_read;
        for (reason, c) in other.skipped {
            self.skipped.entry(reason).or_default().absorb(c);
        }
        self.prompt_mismatch.absorb(other.prompt_mismatch);
        self.truncated.absorb(other.truncated);
    }

    /// Total number of skipped rows.
    pub fn total_skipped(&self) -> usize {
        self.skipped.values().map(|c| c.count).sum()
    }

    /// The number of rows skipped for `reason`.
    pub fn skipped_for(&self, reason: SkipReason) -> usize {
        self.skipped.get(&reason).map_or(0, |c| c.count)
    }
}

impl std::fmt::Display for DataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "rows read: {}", self.rows_read)?;
        if self.skipped.is_empty() {
            writeln!(f, "rows skipped: 0")?;
        } else {
            writeln!(f, "rows skipped: {}", self.total_skipped())?;
            for (reason, c) in &self.skipped {
                writeln!(f, "  {reason}: {c}")?;
            }
        }
        if self.prompt_mismatch.count > 0 {
            writeln!(f, "prompt ids not a prefix of prompt+answer ids: {}", self.prompt_mismatch)?;
        }
        if self.truncated.count > 0 {
            writeln!(f, "truncated to max_length: {}", self.truncated)?;
        }
        Ok(())
    }
}

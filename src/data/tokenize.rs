//! Tokenizing preference pairs as TRL 1.16 `DPOTrainer` does: prompt ids, chosen and rejected
//! completion ids, keep-start truncation to `max_length`; then the one rule every kept pair
//! satisfies, or the row is refused (counted in the [`DataReport`] with its line):
//!
//! **a pair is `prompt ids | completion ids`, where the completion is exactly the final
//! assistant message(s) of that side plus one EOS (or the template's end-of-turn), and chosen and
//! rejected share the prompt ids** ([`PairTokenizer::violation`] checks it on the final ids).
//!
//! Conversations (TRL `_prepare_dataset`, conversational branch; the procedure is spelled out in
//! `../shared/golden/smollm2_golden.json` `orca_pairs_procedure`):
//! - `prompt_ids = tokenize(template(prompt, add_generation_prompt = true))`
//! - `prompt_chosen_ids = tokenize(template(prompt + chosen))` (likewise rejected)
//! - `n_prompt` = the common prefix length of the three id sequences (== `prompt_ids.len()` unless
//!   the template or tokenizer merges across the boundary; such rows are counted in
//!   [`DataReport::prompt_mismatch`]); `prompt_ids = prompt_ids[..n_prompt]`,
//!   `chosen_ids = prompt_chosen_ids[n_prompt..]`. A row whose rendered prompt (generation
//!   prompt included) is not the start of its rendered prompt + answer is refused
//!   ([`SkipReason::PromptNotPrefix`]): the boundary would fall inside an earlier turn or header
//!   (e.g. SmolLM2's template adds its default system turn only when there is a message, so an
//!   empty prompt renders as a bare assistant header).
//! - Rendered text is tokenized with `add_special_tokens = false` (as `apply_chat_template`
//!   does), so a template that writes BOS gets exactly one. When the tokenizer's configuration
//!   adds a BOS (its post-processor prepends one) and the template does not write it, BOS is
//!   prepended (one warning).
//! - Message content is plain text: only the template's own scaffolding becomes special-token
//!   ids. A content holding special-token text (`<|im_end|>`, `<|im_start|>`, ...) is tokenized
//!   with special-token matching off: the template is rendered once more with a placeholder per
//!   content, the scaffolding between placeholders is split at its special tokens, and the text
//!   in between (scaffolding text and content) is tokenized as plain text. (Rows without
//!   special-token text in their content take the plain path, bit for bit today's ids.) A
//!   template that alters content (e.g. trims it) cannot be split this way; its rows holding
//!   special-token text are refused ([`SkipReason::SpecialTokenInContent`]).
//! - The end-of-turn tokens the template writes after the answer (`<|im_end|>\n` for ChatML)
//!   belong to the completion; no extra EOS. A template that writes none gets EOS appended (one
//!   warning naming the template); of several (end-of-turn then EOS), the first is kept.
//!
//! Plain text (TRL's non-conversational branch): the EOS token text is appended to chosen and
//! rejected unless already there (trailing whitespace after a final EOS is dropped, so
//! `"answer<|im_end|>\n"` ends in one EOS, not two); `prompt` and `prompt + chosen` are
//! tokenized with the tokenizer's special tokens (`add_special_tokens = true`, false when the
//! text already starts with the BOS token), then split as above. No chat template is used; text
//! rows are raw text, so special-token text in them is tokenized as special tokens (that is how
//! pre-templated transcripts are written). A completion holding an EOS / end-of-turn before its
//! end is refused ([`SkipReason::EosInsideCompletion`]).
//!
//! Truncation (TRL 1.16, `truncation_mode = "keep_start"`): `prompt + completion` is cut to its
//! first `max_length` tokens, so only completion tokens are ever cut (a cut completion loses its
//! EOS, as in TRL). A row whose prompt alone
//! has `>= max_length` tokens is dropped and counted ([`SkipReason::PromptTooLong`]; TRL drops
//! it too: no completion token would remain). TRL 1.16 has no `max_prompt_length`; ours is an
//! optional extra filter: rows whose prompt has more tokens are dropped and counted
//! ([`SkipReason::PromptOverMaxPromptLength`]). Prompts are never cut (that would remove the
//! assistant header the completion is conditioned on). Chosen and rejected that are identical
//! once truncated are [`SkipReason::IdenticalAfterTruncation`] (an error under
//! [`OnIdentical::Error`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::{ChatTemplate, DataReport, Message, OnIdentical, Pair, PreferenceExample, SkipReason};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

/// Length limits, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeOptions {
    /// Maximum of prompt + completion; longer sequences keep their start. `None`: no limit.
    pub max_length: Option<usize>,
    /// Rows whose prompt is longer are dropped and counted. `None`: no limit.
    pub max_prompt_length: Option<usize>,
}

/// A tokenized preference pair: `prompt_ids ++ chosen_ids` is the chosen sequence,
/// `prompt_ids ++ rejected_ids` the rejected one, both at most `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    /// Line of the row in its file.
    pub line: usize,
    /// The prompt, ending with the template's generation prompt (`<|im_start|>assistant\n`).
    pub prompt_ids: Vec<u32>,
    /// The chosen completion (answer + end-of-turn tokens), after truncation.
    pub chosen_ids: Vec<u32>,
    /// The rejected completion, after truncation.
    pub rejected_ids: Vec<u32>,
}

impl TokenizedPair {
    /// Tokens of prompt + chosen.
    pub fn chosen_len(&self) -> usize {
        self.prompt_ids.len() + self.chosen_ids.len()
    }

    /// Tokens of prompt + rejected.
    pub fn rejected_len(&self) -> usize {
        self.prompt_ids.len() + self.rejected_ids.len()
    }

    /// The longer of the two sequences (what the pair costs in a padded batch).
    pub fn max_len(&self) -> usize {
        self.chosen_len().max(self.rejected_len())
    }

    /// `prompt_ids ++ chosen_ids`.
    pub fn chosen_input_ids(&self) -> Vec<u32> {
        [self.prompt_ids.as_slice(), &self.chosen_ids].concat()
    }

    /// `prompt_ids ++ rejected_ids`.
    pub fn rejected_input_ids(&self) -> Vec<u32> {
        [self.prompt_ids.as_slice(), &self.rejected_ids].concat()
    }
}

/// The ids of one pair before truncation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The shared prompt ids (the common prefix of the three tokenizations).
    pub prompt_ids: Vec<u32>,
    /// Chosen completion ids, untruncated.
    pub chosen_ids: Vec<u32>,
    /// Rejected completion ids, untruncated.
    pub rejected_ids: Vec<u32>,
    /// Whether the separately tokenized prompt was a prefix of both prompt + answer tokenizations.
    pub prompt_is_prefix: bool,
}

/// What [`PairTokenizer::encode`] makes of a row: its ids, or the reason it is refused.
pub type Encoding = std::result::Result<Encoded, SkipReason>;

/// One piece of a rendered conversation: template scaffolding, or the content of message `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Scaffold(String),
    Content(usize),
}

/// Marks a content in the placeholder rendering (a noncharacter: never in real text, and kept
/// as is by templates).
const PLACEHOLDER: char = '\u{10FFFF}';

/// Tokenizes [`PreferenceExample`]s with a tokenizer and (for conversations) a chat template.
pub struct PairTokenizer<'a> {
    tokenizer: &'a Tokenizer,
    /// `tokenizer.inner` with special-token matching off (content is plain text).
    plain: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    /// How warnings name the template.
    template_name: String,
    /// The limits applied by [`PairTokenizer::tokenize`].
    pub options: TokenizeOptions,
    /// What to do with a pair whose chosen and rejected ids are identical after truncation.
    pub on_identical: OnIdentical,
    /// Special added tokens `(text, id)`, longest text first.
    specials: Vec<(String, u32)>,
    /// Ids that may end a completion: the EOS ids and the template's end-of-turn.
    end_ids: Vec<u32>,
    /// The id appended to a completion the template ends without an end-of-turn.
    eos_id: Option<u32>,
    /// The BOS id, when the tokenizer's configuration adds one (its post-processor prepends it).
    bos_id: Option<u32>,
    warned_no_end: AtomicBool,
    warned_bos: AtomicBool,
}

impl<'a> PairTokenizer<'a> {
    /// Use `tokenizer`, with `template` (Jinja source) replacing the model's chat template when given.
    ///
    /// Errors: the template does not compile.
    pub fn new(tokenizer: &'a Tokenizer, template: Option<&str>, options: TokenizeOptions) -> Result<Self> {
        let template_name = if template.is_some() { "the chat template override" } else { "the model's chat template" }.to_string();
        let source = template.or(tokenizer.chat_template.as_deref());
        let template = source
            .map(|s| ChatTemplate::new(s, tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref()))
            .transpose()
            .map_err(|e| Error::Config(format!("chat template does not compile: {e:#}")))?;
        let mut plain = tokenizer.inner.clone();
        plain.set_encode_special_tokens(true);
        let mut specials: Vec<(String, u32)> = tokenizer
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let eos_id = tokenizer.eos_token.as_deref().and_then(|t| tokenizer.inner.token_to_id(t)).or(tokenizer.eos_token_ids.first().copied());
        let mut end_ids: Vec<u32> = tokenizer.eos_token_ids.iter().copied().chain(eos_id).collect();
        let bos_id = tokenizer.bos_token.as_deref().and_then(|t| tokenizer.inner.token_to_id(t)).filter(|&bos| {
            let first = |special: bool| tokenizer.inner.encode("a", special).ok().and_then(|e| e.get_ids().first().copied());
            first(true) == Some(bos) && first(false) != Some(bos)
        });
        let mut pt = Self {
            tokenizer,
            plain,
            template,
            template_name,
            options,
            on_identical: OnIdentical::Skip,
            specials,
            end_ids: Vec::new(),
            eos_id,
            bos_id,
            warned_no_end: AtomicBool::new(false),
            warned_bos: AtomicBool::new(false),
        };
        end_ids.extend(pt.template_end_of_turn());
        end_ids.sort_unstable();
        end_ids.dedup();
        pt.end_ids = end_ids;
        Ok(pt)
    }

    /// The same, with `on_identical` for pairs identical after tokenization and truncation.
    pub fn with_on_identical(mut self, on_identical: OnIdentical) -> Self {
        self.on_identical = on_identical;
        self
    }

    /// The same, with warnings naming the template as `name` (e.g. its file).
    pub fn with_template_name(mut self, name: impl Into<String>) -> Self {
        self.template_name = name.into();
        self
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }

    /// The ids that may end a completion (sorted): the tokenizer's EOS ids and the chat
    /// template's end-of-turn token (the first special token it writes after an assistant
    /// message).
    pub fn end_ids(&self) -> &[u32] {
        &self.end_ids
    }

    /// The BOS id when the tokenizer's configuration adds one to every sequence, else `None`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The template's end-of-turn: the first special token in what it writes after an assistant
    /// message (`<|im_end|>` for ChatML); `None` without a template, or when it writes none.
    fn template_end_of_turn(&self) -> Option<u32> {
        let t = self.template.as_ref()?;
        let mark = format!("{PLACEHOLDER}1{PLACEHOLDER}");
        let probe = [Message::new("user", format!("{PLACEHOLDER}0{PLACEHOLDER}")), Message::new("assistant", mark.clone())];
        let text = t.render(&probe, false).ok()?;
        let after = &text[text.find(&mark)? + mark.len()..];
        split_specials(after, &self.specials).into_iter().find_map(|p| match p {
            Part::Special(id) => Some(id),
            Part::Text(_) => None,
        })
    }

    fn has_special(&self, text: &str) -> bool {
        self.specials.iter().any(|(s, _)| text.contains(s.as_str()))
    }

    /// Whether `id` decodes to whitespace only (`\n`, spaces).
    fn is_whitespace(&self, id: u32) -> bool {
        !self.end_ids.contains(&id) && self.tokenizer.inner.decode(&[id], false).is_ok_and(|s| !s.is_empty() && s.trim().is_empty())
    }

    /// Render `messages` and tokenize the text, content as plain text (see the module doc);
    /// `Ok(Err(_))` when the row must be refused.
    fn encode_messages(&self, t: &ChatTemplate, messages: &[Message], gen: bool, err: &dyn Fn(String) -> Error) -> Result<std::result::Result<(String, Vec<u32>), SkipReason>> {
        let text = t.render(messages, gen).map_err(|e| err(format!("chat template: {e:#}")))?;
        if !messages.iter().any(|m| self.has_special(&m.content)) {
            let ids = self.tokenizer.inner.encode(text.as_str(), false).map_err(|e| err(format!("tokenizer: {e}")))?;
            return Ok(Ok((text, ids.get_ids().to_vec())));
        }
        let Some(pieces) = self.pieces(t, messages, gen, &text) else { return Ok(Err(SkipReason::SpecialTokenInContent)) };
        // scaffolding split at its special tokens; the text between them (scaffolding text and
        // content) tokenized with special-token matching off
        let mut ids = Vec::new();
        let mut run = String::new();
        let flush = |run: &mut String, ids: &mut Vec<u32>| -> Result<()> {
            if !run.is_empty() {
                let e = self.plain.encode(run.as_str(), false).map_err(|e| err(format!("tokenizer: {e}")))?;
                ids.extend_from_slice(e.get_ids());
                run.clear();
            }
            Ok(())
        };
        for piece in &pieces {
            match piece {
                Piece::Content(i) => run.push_str(&messages[*i].content),
                Piece::Scaffold(s) => {
                    for part in split_specials(s, &self.specials) {
                        match part {
                            Part::Text(text) => run.push_str(text),
                            Part::Special(id) => {
                                flush(&mut run, &mut ids)?;
                                ids.push(id);
                            }
                        }
                    }
                }
            }
        }
        flush(&mut run, &mut ids)?;
        Ok(Ok((text, ids)))
    }

    /// `text` (the rendering of `messages`) cut into scaffolding and content pieces: the template
    /// rendered with a placeholder for each content tells where each content goes. `None` when
    /// the template does not insert content verbatim (the pieces with the real contents must
    /// give `text` back).
    fn pieces(&self, t: &ChatTemplate, messages: &[Message], gen: bool, text: &str) -> Option<Vec<Piece>> {
        if messages.iter().any(|m| m.content.contains(PLACEHOLDER)) {
            return None;
        }
        let marked: Vec<Message> =
            messages.iter().enumerate().map(|(i, m)| Message::new(m.role.clone(), format!("{PLACEHOLDER}{i}{PLACEHOLDER}"))).collect();
        let rendered = t.render(&marked, gen).ok()?;
        let mut pieces = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(PLACEHOLDER) {
            pieces.push(Piece::Scaffold(rest[..start].to_string()));
            let after = &rest[start + PLACEHOLDER.len_utf8()..];
            let end = after.find(PLACEHOLDER)?;
            let i: usize = after[..end].parse().ok()?;
            messages.get(i)?;
            pieces.push(Piece::Content(i));
            rest = &after[end + PLACEHOLDER.len_utf8()..];
        }
        pieces.push(Piece::Scaffold(rest.to_string()));
        let rebuilt: String = pieces
            .iter()
            .map(|p| match p {
                Piece::Scaffold(s) => s.as_str(),
                Piece::Content(i) => messages[*i].content.as_str(),
            })
            .collect();
        (rebuilt == text).then_some(pieces)
    }
    /// Tokenize one pair without truncation (see the module doc for the procedure): its ids,
    /// or (`Ok(Err(reason))`) why the row is refused.
    ///
    /// Errors (named `source:line`): a conversation and no chat template, a role other than
    /// system/user/assistant, a template error (e.g. its `raise_exception`), a tokenizer error.
    pub fn encode(&self, ex: &PreferenceExample, source: &Path) -> Result<Encoding> {
        let err = |msg: String| Error::input(source, Some(ex.line), msg);
        match &ex.pair {
            Pair::Chat { prompt, chosen, rejected } => self.encode_chat(prompt, chosen, rejected, &err),
            Pair::Text { prompt, chosen, rejected } => self.encode_text(prompt, chosen, rejected, &err),
        }
    }

    fn encode_chat(&self, prompt: &[Message], chosen: &[Message], rejected: &[Message], err: &dyn Fn(String) -> Error) -> Result<Encoding> {
        let t = self.template.as_ref().ok_or_else(|| {
            err("this row is a conversation and needs a chat template, but the model has none; \
                 supply one (data.chat_template)"
                .into())
        })?;
        if let Some(m) = prompt.iter().chain(chosen).chain(rejected).find(|m| !super::formats::ROLES.contains(&m.role.as_str())) {
            return Err(err(format!("unknown role {:?} (expected system, user or assistant)", m.role)));
        }
        if chosen.iter().chain(rejected).any(|m| m.role != "assistant") {
            return Ok(Err(SkipReason::CompletionNotAssistant));
        }
        let (prompt_text, mut prompt_ids) = match self.encode_messages(t, prompt, true, err)? {
            Ok(x) => x,
            Err(reason) => return Ok(Err(reason)),
        };
        let mut sides = Vec::with_capacity(2);
        for answer in [chosen, rejected] {
            let messages: Vec<Message> = prompt.iter().chain(answer).cloned().collect();
            let (text, ids) = match self.encode_messages(t, &messages, false, err)? {
                Ok(x) => x,
                Err(reason) => return Ok(Err(reason)),
            };
            // the rendered prompt (with its generation prompt) must be where the answer starts
            if !text.starts_with(&prompt_text) {
                return Ok(Err(SkipReason::PromptNotPrefix));
            }
            sides.push(ids);
        }
        let mut rejected_ids = sides.pop().unwrap_or_default();
        let mut chosen_ids = sides.pop().unwrap_or_default();
        if let Some(bos) = self.bos_id {
            if prompt_ids.first() != Some(&bos) {
                if !self.warned_bos.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{} does not write the BOS token {:?}, which the tokenizer adds to every sequence: prepending it (id {bos})",
                        self.template_name,
                        self.tokenizer.bos_token.as_deref().unwrap_or_default()
                    );
                }
                for ids in [&mut prompt_ids, &mut chosen_ids, &mut rejected_ids] {
                    ids.insert(0, bos);
                }
            }
        }
        let mut e = split(prompt_ids, chosen_ids, rejected_ids);
        for ids in [&mut e.chosen_ids, &mut e.rejected_ids] {
            self.end_completion(ids);
        }
        Ok(Ok(e))
    }

    fn encode_text(&self, prompt: &str, chosen: &str, rejected: &str, err: &dyn Fn(String) -> Error) -> Result<Encoding> {
        let enc = |text: &str, special: bool| -> Result<Vec<u32>> {
            let e = self.tokenizer.inner.encode(text, special).map_err(|e| err(format!("tokenizer: {e}")))?;
            Ok(e.get_ids().to_vec())
        };
        let special = !self.tokenizer.bos_token.as_deref().is_some_and(|b| !b.is_empty() && prompt.starts_with(b));
        let with_eos = |s: &str| match self.tokenizer.eos_token.as_deref().filter(|e| !e.is_empty()) {
            Some(eos) if s.ends_with(eos) => format!("{prompt}{s}"),
            // "answer<eos>\n": the whitespace after the final EOS goes, no second EOS
            Some(eos) if s.trim_end().ends_with(eos) => format!("{prompt}{}", s.trim_end()),
            Some(eos) => format!("{prompt}{s}{eos}"),
            None => format!("{prompt}{s}"),
        };
        let e = split(enc(prompt, special)?, enc(&with_eos(chosen), special)?, enc(&with_eos(rejected), special)?);
        if self.eos_id.is_some() {
            for ids in [&e.chosen_ids, &e.rejected_ids] {
                let ends = ids.iter().filter(|id| self.end_ids.contains(id)).count();
                if ends != 1 || !ids.last().is_some_and(|id| self.end_ids.contains(id)) {
                    return Ok(Err(SkipReason::EosInsideCompletion));
                }
            }
        }
        Ok(Ok(e))
    }

    /// Make a chat completion end in exactly one end-of-turn / EOS (followed only by whitespace
    /// the template writes): append EOS when the template wrote none (one warning), keep the
    /// first when it wrote several.
    fn end_completion(&self, ids: &mut Vec<u32>) {
        let is_end = |id: &u32| self.end_ids.contains(id);
        let tail = ids.iter().rposition(|id| !is_end(id) && !self.is_whitespace(*id)).map_or(0, |k| k + 1);
        let ends: Vec<usize> = (tail..ids.len()).filter(|&k| is_end(&ids[k])).collect();
        match ends.as_slice() {
            [] => {
                let Some(eos) = self.eos_id else { return };
                if !self.warned_no_end.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{} writes no end-of-turn token after an assistant message: appending EOS {:?} (id {eos}) to every completion",
                        self.template_name,
                        self.tokenizer.eos_token.as_deref().unwrap_or_default()
                    );
                }
                ids.push(eos);
            }
            [_] => {}
            [_, second, ..] => ids.truncate(*second),
        }
    }

    /// Tokenize and truncate one pair; `None` when the row is dropped (counted in `report`:
    /// refused by [`Self::encode`], prompt too long, or breaking the rule, [`Self::violation`]).
    /// Prefix mismatches and truncations are counted too.
    ///
    /// Errors: as [`Self::encode`] and [`Self::truncate`].
    pub fn tokenize(&self, ex: &PreferenceExample, source: &Path, report: &mut DataReport) -> Result<Option<TokenizedPair>> {
        let e = self.encode(ex, source)?;
        self.finish(ex.line, e, source, report)
    }

    /// Count an [`Encoding`] in `report` and truncate it.
    fn finish(&self, line: usize, e: Encoding, source: &Path, report: &mut DataReport) -> Result<Option<TokenizedPair>> {
        match e {
            Err(reason) => {
                report.skip(reason, line);
                Ok(None)
            }
            Ok(e) => {
                if !e.prompt_is_prefix {
                    report.prompt_mismatch.add(line);
                }
                self.truncate(line, e, source, report)
            }
        }
    }

    /// Apply the limits to an encoded pair (see the module doc), then check the rule on the
    /// final ids ([`Self::violation`]); `None` when dropped (counted in `report`).
    ///
    /// Errors: chosen and rejected identical after truncation under [`OnIdentical::Error`]
    /// (`source:line: chosen and rejected are identical after tokenization and truncation ...`).
    pub fn truncate(&self, line: usize, e: Encoded, source: &Path, report: &mut DataReport) -> Result<Option<TokenizedPair>> {
        let n_prompt = e.prompt_ids.len();
        if self.options.max_prompt_length.is_some_and(|m| n_prompt > m) {
            report.skip(SkipReason::PromptOverMaxPromptLength, line);
            return Ok(None);
        }
        let (mut chosen_ids, mut rejected_ids) = (e.chosen_ids, e.rejected_ids);
        if let Some(max) = self.options.max_length {
            if n_prompt >= max {
                report.skip(SkipReason::PromptTooLong, line);
                return Ok(None);
            }
            let keep = max - n_prompt;
            if chosen_ids.len() > keep || rejected_ids.len() > keep {
                report.truncated.add(line);
                chosen_ids.truncate(keep);
                rejected_ids.truncate(keep);
            }
        }
        let t = TokenizedPair { line, prompt_ids: e.prompt_ids, chosen_ids, rejected_ids };
        match self.violation(&t) {
            None => Ok(Some(t)),
            Some(SkipReason::IdenticalAfterTruncation) if self.on_identical == OnIdentical::Error => Err(Error::input(
                source,
                Some(line),
                format!(
                    "chosen and rejected are identical after tokenization and truncation (max_length {}): \
                     they differ only past it, so the pair has loss ln 2 and no gradient \
                     (on_identical = \"skip\" skips such rows)",
                    self.options.max_length.map_or("none".to_string(), |m| m.to_string())
                ),
            )),
            Some(reason) => {
                report.skip(reason, line);
                Ok(None)
            }
        }
    }

    /// How a tokenized pair breaks the rule of the module doc, checked on its final ids, or
    /// `None`: a non-empty prompt (the first completion token needs a token to be predicted
    /// from), starting with exactly one BOS when the tokenizer adds BOS; non-empty chosen and
    /// rejected completions that differ; both sequences within `max_length`; no completion
    /// ending in two end-of-turn / EOS tokens in a row.
    pub fn violation(&self, t: &TokenizedPair) -> Option<SkipReason> {
        if t.prompt_ids.is_empty() {
            return Some(SkipReason::EmptyPrompt);
        }
        if let Some(bos) = self.bos_id {
            if t.prompt_ids[0] != bos || t.prompt_ids.get(1) == Some(&bos) {
                return Some(SkipReason::BosNotOnce);
            }
        }
        if t.chosen_ids.is_empty() {
            return Some(SkipReason::EmptyChosen);
        }
        if t.rejected_ids.is_empty() {
            return Some(SkipReason::EmptyRejected);
        }
        if t.chosen_ids == t.rejected_ids {
            return Some(SkipReason::IdenticalAfterTruncation);
        }
        if self.options.max_length.is_some_and(|m| t.max_len() > m) {
            return Some(SkipReason::PromptTooLong);
        }
        for ids in [&t.chosen_ids, &t.rejected_ids] {
            let tail = ids.iter().rposition(|id| !self.end_ids.contains(id) && !self.is_whitespace(*id)).map_or(0, |k| k + 1);
            if ids[tail..].iter().filter(|id| self.end_ids.contains(id)).count() > 1 {
                return Some(SkipReason::EosInsideCompletion);
            }
        }
        None
    }

    /// Tokenize every example in order, dropping (and counting) the rows [`Self::tokenize`] drops.
    ///
    /// Errors: as [`Self::tokenize`]; conversations without a chat template fail before any work,
    /// naming the first conversational row.
    pub fn tokenize_all(&self, examples: &[PreferenceExample], source: &Path, report: &mut DataReport) -> Result<Vec<TokenizedPair>> {
        use rayon::prelude::*;
        self.check_template(examples, source)?;
        // encode in parallel (pure per row), then count and truncate in file order, so the
        // result and the report do not depend on the thread count
        let encoded: Vec<Result<Encoding>> = examples.par_iter().map(|ex| self.encode(ex, source)).collect();
        let mut out = Vec::with_capacity(examples.len());
        for (ex, e) in examples.iter().zip(encoded) {
            if let Some(t) = self.finish(ex.line, e?, source, report)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Errors when `examples` hold a conversation and there is no chat template (naming the
    /// first conversational row).
    pub fn check_template(&self, examples: &[PreferenceExample], source: &Path) -> Result<()> {
        match examples.iter().find(|e| e.pair.is_chat()) {
            Some(ex) if self.template.is_none() => Err(Error::input(
                source,
                Some(ex.line),
                "the rows are conversations and need a chat template, but the model has none; \
                 supply one (data.chat_template)",
            )),
            _ => Ok(()),
        }
    }

    /// The prompt rendered as text (template with generation prompt for conversations), for
    /// `inspect`. Errors as [`Self::encode`].
    pub fn render_prompt(&self, ex: &PreferenceExample, source: &Path) -> Result<String> {
        match &ex.pair {
            Pair::Text { prompt, .. } => Ok(prompt.clone()),
            Pair::Chat { prompt, .. } => {
                let t = self.template.as_ref().ok_or_else(|| Error::input(source, Some(ex.line), "no chat template"))?;
                t.render(prompt, true).map_err(|e| Error::input(source, Some(ex.line), format!("chat template: {e:#}")))
            }
        }
    }
}

/// The three tokenizations of a pair split at their common prefix (TRL).
fn split(prompt: Vec<u32>, prompt_chosen: Vec<u32>, prompt_rejected: Vec<u32>) -> Encoded {
    let n = common_prefix(&prompt, &prompt_chosen).min(common_prefix(&prompt, &prompt_rejected));
    Encoded {
        prompt_is_prefix: n == prompt.len(),
        chosen_ids: prompt_chosen[n..].to_vec(),
        rejected_ids: prompt_rejected[n..].to_vec(),
        prompt_ids: { let mut p = prompt; p.truncate(n); p },
    }
}

/// A part of a text split at special-token strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part<'t> {
    Text(&'t str),
    Special(u32),
}

/// `text` split at the special-token strings of `specials` (`(text, id)`, longest first), as the
/// tokenizer's added vocabulary splits it: leftmost match first, the longest at a position.
fn split_specials<'t>(text: &'t str, specials: &[(String, u32)]) -> Vec<Part<'t>> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        let hit = specials
            .iter()
            .filter_map(|(s, id)| rest.find(s.as_str()).map(|i| (i, s.len(), *id)))
            .min_by_key(|&(i, len, _)| (i, std::cmp::Reverse(len)));
        match hit {
            Some((i, len, id)) => {
                if i > 0 {
                    out.push(Part::Text(&rest[..i]));
                }
                out.push(Part::Special(id));
                rest = &rest[i + len..];
            }
            None => {
                if !rest.is_empty() {
                    out.push(Part::Text(rest));
                }
                return out;
            }
        }
    }
}

/// Length of the common prefix of `a` and `b`.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_specials_is_leftmost_then_longest() {
        let specials = vec![("<|im_end|>".to_string(), 2), ("<|im".to_string(), 9), ("<s>".to_string(), 1)];
        let mut sorted = specials.clone();
        sorted.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        assert_eq!(
            split_specials("a<|im_end|>\n<s>b<|imx", &sorted),
            vec![Part::Text("a"), Part::Special(2), Part::Text("\n"), Part::Special(1), Part::Text("b"), Part::Special(9), Part::Text("x")]
        );
        assert_eq!(split_specials("", &sorted), vec![]);
        assert_eq!(split_specials("plain", &sorted), vec![Part::Text("plain")]);
    }

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}

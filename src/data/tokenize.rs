//! Tokenizing preference pairs as TRL 1.16 `DPOTrainer` does: prompt ids, chosen and rejected
//! completion ids, keep-start truncation to `max_length`.
//!
//! Conversations (TRL `_prepare_dataset`, conversational branch; the procedure is spelled out in
//! `../shared/golden/smollm2_golden.json` `orca_pairs_procedure`):
//! - `prompt_ids = tokenize(template(prompt, add_generation_prompt = true))`
//! - `prompt_chosen_ids = tokenize(template(prompt + chosen))` (likewise rejected)
//! - `n_prompt` = the common prefix length of the three id sequences (== `prompt_ids.len()` unless
//!   the template or tokenizer merges across the boundary; such rows are counted in
//!   [`DataReport::prompt_mismatch`]); `prompt_ids = prompt_ids[..n_prompt]`,
//!   `chosen_ids = prompt_chosen_ids[n_prompt..]`.
//! - Rendered text is tokenized with `add_special_tokens = false` (as `apply_chat_template`
//!   does), so a template that writes BOS gets exactly one. The end-of-turn tokens the template
//!   writes after the answer (`<|im_end|>\n` for ChatML) belong to the completion; no extra EOS.
//!
//! Plain text (TRL's non-conversational branch): the EOS token text is appended to chosen and
//! rejected unless already there; `prompt` and `prompt + chosen` are tokenized with the
//! tokenizer's special tokens (`add_special_tokens = true`, false when the text already starts
//! with the BOS token), then split as above. No chat template is used.
//!
//! Truncation (TRL 1.16, `truncation_mode = "keep_start"`): `prompt + completion` is cut to its
//! first `max_length` tokens, so only completion tokens are ever cut. A row whose prompt alone
//! has `>= max_length` tokens is dropped and counted ([`SkipReason::PromptTooLong`]; TRL drops
//! it too: no completion token would remain). TRL 1.16 has no `max_prompt_length`; ours is an
//! optional extra filter: rows whose prompt has more tokens are dropped and counted
//! ([`SkipReason::PromptOverMaxPromptLength`]). Prompts are never cut (that would remove the
//! assistant header the completion is conditioned on).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ChatTemplate, DataReport, Message, Pair, PreferenceExample, SkipReason};
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

/// Tokenizes [`PreferenceExample`]s with a tokenizer and (for conversations) a chat template.
pub struct PairTokenizer<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<ChatTemplate>,
    /// The limits applied by [`PairTokenizer::tokenize`].
    pub options: TokenizeOptions,
}

impl<'a> PairTokenizer<'a> {
    /// Use `tokenizer`, with `template` (Jinja source) replacing the model's chat template when given.
    ///
    /// Errors: the template does not compile.
    pub fn new(tokenizer: &'a Tokenizer, template: Option<&str>, options: TokenizeOptions) -> Result<Self> {
        let source = template.or(tokenizer.chat_template.as_deref());
        let template = source
            .map(|s| ChatTemplate::new(s, tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref()))
            .transpose()
            .map_err(|e| Error::Config(format!("chat template does not compile: {e:#}")))?;
        Ok(Self { tokenizer, template, options })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }

    /// Tokenize one pair without truncation (see the module doc for the procedure).
    ///
    /// Errors (named `source:line`): a conversation and no chat template, a template error
    /// (e.g. its `raise_exception`), a tokenizer error.
    pub fn encode(&self, ex: &PreferenceExample, source: &Path) -> Result<Encoded> {
        let err = |msg: String| Error::input(source, Some(ex.line), msg);
        let enc = |text: &str, special: bool| -> Result<Vec<u32>> {
            let e = self.tokenizer.inner.encode(text, special).map_err(|e| err(format!("tokenizer: {e}")))?;
            Ok(e.get_ids().to_vec())
        };
        let (prompt, prompt_chosen, prompt_rejected) = match &ex.pair {
            Pair::Chat { prompt, chosen, rejected } => {
                let t = self.template.as_ref().ok_or_else(|| {
                    err("this row is a conversation and needs a chat template, but the model has none; \
                         supply one (data.chat_template)"
                        .into())
                })?;
                let render = |m: &[Message], gen: bool| t.render(m, gen).map_err(|e| err(format!("chat template: {e:#}")));
                let pc: Vec<Message> = prompt.iter().chain(chosen).cloned().collect();
                let pr: Vec<Message> = prompt.iter().chain(rejected).cloned().collect();
                let (p, c, r) = (render(prompt, true)?, render(&pc, false)?, render(&pr, false)?);
                (enc(&p, false)?, enc(&c, false)?, enc(&r, false)?)
            }
            Pair::Text { prompt, chosen, rejected } => {
                let special = !self.tokenizer.bos_token.as_deref().is_some_and(|b| !b.is_empty() && prompt.starts_with(b));
                let with_eos = |s: &str| match self.tokenizer.eos_token.as_deref() {
                    Some(eos) if !s.ends_with(eos) => format!("{prompt}{s}{eos}"),
                    _ => format!("{prompt}{s}"),
                };
                (enc(prompt, special)?, enc(&with_eos(chosen), special)?, enc(&with_eos(rejected), special)?)
            }
        };
        let n = common_prefix(&prompt, &prompt_chosen).min(common_prefix(&prompt, &prompt_rejected));
        Ok(Encoded {
            prompt_is_prefix: n == prompt.len(),
            prompt_ids: prompt[..n].to_vec(),
            chosen_ids: prompt_chosen[n..].to_vec(),
            rejected_ids: prompt_rejected[n..].to_vec(),
        })
    }

    /// Tokenize and truncate one pair; `None` when the row is dropped (counted in `report`:
    /// prompt too long, or an empty completion). Prefix mismatches and truncations are counted too.
    pub fn tokenize(&self, ex: &PreferenceExample, source: &Path, report: &mut DataReport) -> Result<Option<TokenizedPair>> {
        let e = self.encode(ex, source)?;
        if !e.prompt_is_prefix {
            report.prompt_mismatch.add(ex.line);
        }
        Ok(self.truncate(ex.line, e, report))
    }

    /// Apply the limits to an encoded pair (see the module doc); `None` when dropped.
    pub fn truncate(&self, line: usize, e: Encoded, report: &mut DataReport) -> Option<TokenizedPair> {
        let n_prompt = e.prompt_ids.len();
        if self.options.max_prompt_length.is_some_and(|m| n_prompt > m) {
            report.skip(SkipReason::PromptOverMaxPromptLength, line);
            return None;
        }
        let (mut chosen_ids, mut rejected_ids) = (e.chosen_ids, e.rejected_ids);
        if let Some(max) = self.options.max_length {
            if n_prompt >= max {
                report.skip(SkipReason::PromptTooLong, line);
                return None;
            }
            let keep = max - n_prompt;
            if chosen_ids.len() > keep || rejected_ids.len() > keep {
                report.truncated.add(line);
                chosen_ids.truncate(keep);
                rejected_ids.truncate(keep);
            }
        }
        if chosen_ids.is_empty() {
            report.skip(SkipReason::EmptyChosen, line);
            return None;
        }
        if rejected_ids.is_empty() {
            report.skip(SkipReason::EmptyRejected, line);
            return None;
        }
        Some(TokenizedPair { line, prompt_ids: e.prompt_ids, chosen_ids, rejected_ids })
    }

    /// Tokenize every example in order, dropping (and counting) the rows [`Self::tokenize`] drops.
    ///
    /// Errors: as [`Self::encode`]; conversations without a chat template fail before any work,
    /// naming the first conversational row.
    pub fn tokenize_all(&self, examples: &[PreferenceExample], source: &Path, report: &mut DataReport) -> Result<Vec<TokenizedPair>> {
        use rayon::prelude::*;
        self.check_template(examples, source)?;
        // encode in parallel (pure per row), then count and truncate in file order, so the
        // result and the report do not depend on the thread count
        let encoded: Vec<Result<Encoded>> = examples.par_iter().map(|ex| self.encode(ex, source)).collect();
        let mut out = Vec::with_capacity(examples.len());
        for (ex, e) in examples.iter().zip(encoded) {
            let e = e?;
            if !e.prompt_is_prefix {
                report.prompt_mismatch.add(ex.line);
            }
            if let Some(t) = self.truncate(ex.line, e, report) {
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

/// Length of the common prefix of `a` and `b`.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}

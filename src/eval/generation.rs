//! Statistics of generated completions: length, truncation, diversity and repetition.
//!
//! Reward hacking shows up in generations as longer answers, answers cut off at the token
//! budget, less lexical diversity and more looping. Everything here works on token ids (one
//! `Vec<u32>` per generation, the generated tokens only: no prompt, no stop token), so it is
//! independent of the model and of detokenisation.
//!
//! Definitions (all over the generations `g_1 .. g_K`, `|g|` = number of tokens):
//! - **length**: `|g|`; mean and median over the K generations (median of an even count is the
//!   mean of the two middle values).
//! - **hit max_new_tokens**: share of generations with `|g| >= max_new_tokens`, i.e. generations
//!   that were cut off rather than ended by a stop token (the stop token is not counted in `|g|`).
//! - **distinct-n** (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
//!   Conversation Models", NAACL, Sec. 4.3; the corpus-level form): the number of distinct
//!   n-grams over all generations divided by the total number of n-grams over all generations,
//!   `|∪_k ngrams(g_k)| / Σ_k max(0, |g_k| - n + 1)`. N-grams never span two generations.
//!   0 when there is no n-gram at all.
//! - **repeated 4-gram rate**: for one generation with `m = |g| - 3 >= 1` 4-grams
//!   `q_1 .. q_m` (in order), `rep(g) = #{ i : q_i = q_j for some j < i } / m`: the share of its
//!   4-grams that already occurred earlier in the same generation (overlapping occurrences
//!   count). The reported rate is the mean of `rep(g)` over the generations that have at least
//!   one 4-gram (`|g| >= 4`); 0 when none has.
//!
//! Generating (the model-dependent part): [`generate_all`] runs [`crate::generate::generate`]
//! once per prompt; prompt `i` is sampled with seed `opts.seed + i`, so a prompt's generation
//! does not depend on the others, and base and adapted model draw with the same seeds. Greedy
//! is `temperature = 0`. Prompts come from a preference file (its tokenized prompts) or from a
//! prompts file ([`load_prompts`]).

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions, Generation, StopReason};
use crate::model::llama::Model;
use crate::model::tokenizer::Tokenizer;

/// Statistics of a set of generations; see the module doc for each definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStats {
    /// Number of generations K.
    pub count: usize,
    /// Mean length in tokens.
    pub mean_length: f64,
    /// Median length in tokens.
    pub median_length: f64,
    /// Share (0..=1) of generations with `len >= max_new_tokens`.
    pub hit_max_new_tokens: f64,
    /// Corpus-level distinct-1 (Li et al. 2016).
    pub distinct_1: f64,
    /// Corpus-level distinct-2 (Li et al. 2016).
    pub distinct_2: f64,
    /// Mean within-generation repeated 4-gram rate.
    pub repeated_4gram_rate: f64,
}

/// All statistics of `generations` (generated token ids only, stop token excluded), with the
/// generation budget `max_new_tokens` used to count truncated generations.
///
/// With no generations every field is 0.
pub fn generation_stats(generations: &[Vec<u32>], max_new_tokens: usize) -> GenerationStats {
    let k = generations.len();
    let mut lengths: Vec<usize> = generations.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    let mean_length = if k == 0 { 0.0 } else { lengths.iter().sum::<usize>() as f64 / k as f64 };
    let hit = generations.iter().filter(|g| g.len() >= max_new_tokens).count();
    GenerationStats {
        count: k,
        mean_length,
        median_length: median_sorted(&lengths),
        hit_max_new_tokens: if k == 0 { 0.0 } else { hit as f64 / k as f64 },
        distinct_1: distinct_n(generations, 1),
        distinct_2: distinct_n(generations, 2),
        repeated_4gram_rate: mean_repeated_ngram_rate(generations, 4),
    }
}

/// Median of an ascending slice (mean of the two middle values for an even count; 0 if empty).
fn median_sorted(sorted: &[usize]) -> f64 {
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2] as f64,
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0,
    }
}

/// Corpus-level distinct-n (Li et al. 2016): distinct n-grams / total n-grams over all
/// generations (n-grams do not cross generation boundaries). 0 when there is no n-gram.
///
/// Panics if `n == 0` (a programming error, not user input).
pub fn distinct_n(generations: &[Vec<u32>], n: usize) -> f64 {
    assert!(n > 0, "distinct_n needs n >= 1");
    let mut distinct: BTreeSet<&[u32]> = BTreeSet::new();
    let mut total = 0usize;
    for g in generations {
        for w in g.windows(n) {
            distinct.insert(w);
            total += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        distinct.len() as f64 / total as f64
    }
}

/// Within one generation: the share of its n-grams that already occurred earlier in it
/// (`None` when it has no n-gram, i.e. `len < n`). See the module doc.
///
/// Panics if `n == 0`.
pub fn repeated_ngram_rate(tokens: &[u32], n: usize) -> Option<f64> {
    assert!(n > 0, "repeated_ngram_rate needs n >= 1");
    let mut seen: BTreeSet<&[u32]> = BTreeSet::new();
    let mut repeats = 0usize;
    let mut total = 0usize;
    for w in tokens.windows(n) {
        if !seen.insert(w) {
            repeats += 1;
        }
        total += 1;
    }
    (total > 0).then(|| repeats as f64 / total as f64)
}

/// Mean of [`repeated_ngram_rate`] over the generations that have at least one n-gram
/// (0 when none has).
pub fn mean_repeated_ngram_rate(generations: &[Vec<u32>], n: usize) -> f64 {
    let rates: Vec<f64> = generations.iter().filter_map(|g| repeated_ngram_rate(g, n)).collect();
    if rates.is_empty() {
        0.0
    } else {
        rates.iter().sum::<f64>() / rates.len() as f64
    }
}

/// The generated tokens that the statistics count: `g.ids` without the final stop token.
pub fn counted_ids(g: &Generation) -> &[u32] {
    match g.stop {
        StopReason::Eos => &g.ids[..g.ids.len().saturating_sub(1)],
        _ => &g.ids,
    }
}

/// Generate once from every prompt (token ids) with `model` (adapters on when `use_adapters`);
/// prompt `i` uses seed `opts.seed + i`. `on_each` is called after each generation.
///
/// Errors: an empty prompt, invalid options, a model error (naming the prompt's index).
pub fn generate_all(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    use_adapters: bool,
    mut on_each: impl FnMut(),
) -> Result<Vec<Generation>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let o = GenerateOptions { seed: opts.seed.wrapping_add(i as u64), ..opts.clone() };
        let g = generate(model, tokenizer, p, &o, use_adapters).map_err(|e| Error::Msg(format!("prompt {}: {e}", i + 1)))?;
        out.push(g);
        on_each();
    }
    Ok(out)
}

/// A prompt to generate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// 1-based line in its file.
    pub line: usize,
    /// The prompt text as the model sees it (chat template applied for conversations).
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
}

/// Read a prompts file: one JSON object a line (blank lines ignored), either
/// `{"prompt": "text"}` (plain text, tokenized as is, as the preference data's text rows) or
/// `{"prompt": [messages]}` / `{"messages": [messages]}` with `{"role", "content"}` messages,
/// rendered by the chat template (`template` replacing the tokenizer's) with the generation
/// prompt added.
///
/// A `.parquet` file is read the same way, a row a record (its row number as the line).
///
/// Errors (`path:line: ...`): a missing file, invalid JSON, neither field, a conversation and
/// no chat template, a template or tokenizer error, an empty prompt; a file with no prompt.
pub fn load_prompts(path: &Path, tokenizer: &Tokenizer, template: Option<&str>) -> Result<Vec<Prompt>> {
    let tpl = template
        .or(tokenizer.chat_template.as_deref())
        .map(|s| ChatTemplate::new(s, tokenizer.bos_token.as_deref(), tokenizer.eos_token.as_deref()))
        .transpose()
        .map_err(|e| Error::Config(format!("chat template does not compile: {e:#}")))?;
    let mut out = Vec::new();
    for (ln, v) in prompt_records(path)? {
        let err = |m: String| Error::input(path, Some(ln), m);
        let field = v.get("prompt").or_else(|| v.get("messages")).ok_or_else(|| err("expected a \"prompt\" or \"messages\" field".into()))?;
        let (text, special) = match field {
            // special tokens (a BOS) added unless the text starts with the BOS already, as the
            // preference data's text rows (`data::tokenize`)
            serde_json::Value::String(s) => {
                (s.clone(), !tokenizer.bos_token.as_deref().is_some_and(|b| !b.is_empty() && s.starts_with(b)))
            }
            serde_json::Value::Array(_) => {
                let msgs: Vec<Message> = serde_json::from_value(field.clone())
                    .map_err(|e| err(format!("messages: expected [{{\"role\", \"content\"}}, ...]: {e}")))?;
                let t = tpl.as_ref().ok_or_else(|| err("a conversation needs a chat template, but the model has none".into()))?;
                (t.render(&msgs, true).map_err(|e| err(format!("chat template: {e:#}")))?, false)
            }
            _ => return Err(err("field prompt: expected a string or a list of messages".into())),
        };
        let ids = tokenizer.inner.encode(text.as_str(), special).map_err(|e| err(format!("tokenizer: {e}")))?.get_ids().to_vec();
        if ids.is_empty() {
            return Err(err("empty prompt".into()));
        }
        out.push(Prompt { line: ln, text, ids });
    }
    if out.is_empty() {
        return Err(Error::input(path, None, "no prompts in the file"));
    }
    Ok(out)
}

/// The records of a prompts file with their 1-based line (JSONL, blank lines skipped) or row
/// (Parquet). Errors: an unreadable file, invalid JSON (`path:line`).
fn prompt_records(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let mut out = Vec::new();
    if crate::data::load::is_parquet(path) {
        crate::data::parquet::for_each_row(path, |at, row| {
            out.push((at.row, row));
            Ok(())
        })?;
        return Ok(out);
    }
    let f = std::fs::File::open(path).map_err(|e| Error::input(path, None, format!("cannot open prompts file: {e}")))?;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let err = |m: String| Error::input(path, Some(i + 1), m);
        let line = line.map_err(|e| err(e.to_string()))?;
        if !line.trim().is_empty() {
            out.push((i + 1, serde_json::from_str(&line).map_err(|e| err(format!("invalid JSON: {e}")))?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn distinct_by_hand() {
        // g1 = 1 2 3 1, g2 = 2 3 4
        // unigrams: 1 2 3 1 2 3 4 -> 7 total, distinct {1,2,3,4} = 4 -> 4/7
        // bigrams: g1: (1,2) (2,3) (3,1); g2: (2,3) (3,4) -> 5 total,
        //          distinct {(1,2),(2,3),(3,1),(3,4)} = 4 -> 4/5
        //          (no bigram (1,2) across the g1|g2 boundary: "1 2" would be counted twice if
        //          the generations were concatenated, giving 6 total)
        let g = vec![vec![1, 2, 3, 1], vec![2, 3, 4]];
        close(distinct_n(&g, 1), 4.0 / 7.0);
        close(distinct_n(&g, 2), 4.0 / 5.0);
        // trigrams: (1,2,3) (2,3,1) (2,3,4) -> all distinct: 3/3
        close(distinct_n(&g, 3), 1.0);
        // no n-gram at all
        close(distinct_n(&[vec![1]], 2), 0.0);
        close(distinct_n(&[], 1), 0.0);
    }

    #[test]
    fn repeated_4gram_by_hand() {
        // 1 2 3 4 1 2 3 4 1: 4-grams q1..q6 =
        // (1234) (2341) (3412) (4123) (1234)* (2341)*  -> 2 repeats of 6 = 1/3
        close(repeated_ngram_rate(&[1, 2, 3, 4, 1, 2, 3, 4, 1], 4).unwrap(), 1.0 / 3.0);
        // 7 7 7 7 7 7: 4-grams (7777) x3 -> the 2nd and 3rd repeat: 2/3 (overlaps count)
        close(repeated_ngram_rate(&[7; 6], 4).unwrap(), 2.0 / 3.0);
        // all distinct
        close(repeated_ngram_rate(&[1, 2, 3, 4, 5], 4).unwrap(), 0.0);
        // too short: no 4-gram
        assert_eq!(repeated_ngram_rate(&[1, 2, 3], 4), None);
        // mean over generations with >= 4 tokens: (1/3 + 2/3 + 0) / 3 = 1/3; [1,2] is skipped
        let g = vec![vec![1, 2, 3, 4, 1, 2, 3, 4, 1], vec![7; 6], vec![1, 2, 3, 4, 5], vec![1, 2]];
        close(mean_repeated_ngram_rate(&g, 4), 1.0 / 3.0);
        // repetition across generations does not count
        close(mean_repeated_ngram_rate(&[vec![1, 2, 3, 4], vec![1, 2, 3, 4]], 4), 0.0);
    }

    #[test]
    fn stats_by_hand() {
        // lengths 4, 3, 6, 2 (sorted 2 3 4 6): mean 15/4 = 3.75, median (3+4)/2 = 3.5
        // max_new_tokens = 4: lengths >= 4 are 4 and 6 -> 2/4 = 0.5
        let g = vec![vec![1, 2, 3, 1], vec![2, 3, 4], vec![5, 5, 5, 5, 5, 5], vec![9, 1]];
        let s = generation_stats(&g, 4);
        assert_eq!(s.count, 4);
        close(s.mean_length, 3.75);
        close(s.median_length, 3.5);
        close(s.hit_max_new_tokens, 0.5);
        // unigrams: 15 total; distinct {1,2,3,4,5,9} = 6 -> 6/15
        close(s.distinct_1, 6.0 / 15.0);
        // bigrams: 3 + 2 + 5 + 1 = 11 total;
        // distinct (1,2) (2,3) (3,1) (3,4) (5,5) (9,1) = 6 -> 6/11
        close(s.distinct_2, 6.0 / 11.0);
        // 4-gram rates: g1 (1 4-gram) 0; g3 (5555)x3 -> 2/3; g2, g4 too short -> (0 + 2/3)/2
        close(s.repeated_4gram_rate, 1.0 / 3.0);
        // odd count median: lengths 1, 5, 2 -> 2
        close(generation_stats(&[vec![0], vec![0; 5], vec![0; 2]], 10).median_length, 2.0);
        let empty = generation_stats(&[], 4);
        assert_eq!(empty.count, 0);
        close(empty.mean_length, 0.0);
    }
}

//! Prefix sharing: a preference pair's prompt runs once, and both completions attend to its
//! cached keys and values.
//!
//! In the concatenated layout (rows `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`,
//! each `prompt ++ completion`, right padded) every prompt is processed twice. Here the prompt
//! of pair `b` (`lp_b` tokens, positions `0..lp_b`) goes through each layer once; the two
//! completion rows `b` and `B + b` then run at positions `lp_b..` with keys/values
//! `[prompt K,V of pair b ; own causal K,V]`. The prompt's keys and values are used by both
//! completions (`cat([K, K], 0)`), so both branches' gradients meet (add) in the shared prompt
//! activations. Every query sees exactly the keys it sees in the concatenated layout, at the
//! same RoPE positions, so the function (and its gradient) is the same up to rounding.
//!
//! Legend: B pairs, N = 2B completion rows, Tp padded prompt length, Tc padded completion
//! length, D hidden width, hd head dim.

use candle_core::{DType, Result, Tensor};

use crate::model::llama::Model;
use crate::model::ops::MASK_VALUE;

/// A preference batch split into shared prompts and their two completions.
#[derive(Debug, Clone)]
pub struct SharedPromptBatch {
    /// `(B, Tp)` u32, right padded.
    pub prompt_ids: Tensor,
    /// `(B, Tp)` u32, 1 = real prompt token.
    pub prompt_mask: Tensor,
    /// Prompt length `lp_b` of each pair (`>= 1`).
    pub prompt_lens: Vec<usize>,
    /// `(2B, Tc)` u32: completion tokens, rows in the concatenated order, right padded.
    pub completion_ids: Tensor,
    /// `(2B, Tc)` u32, 1 = real completion token.
    pub completion_attn: Tensor,
    /// `(2B, Tc)` host copy of the completion-mask values at the completion positions.
    pub completion_weights: Vec<Vec<f64>>,
}

impl SharedPromptBatch {
    /// Number of pairs `B`.
    pub fn pairs(&self) -> usize {
        self.prompt_lens.len()
    }

    /// Splits a concatenated batch: `input_ids (2B, T)` u32, `attention_mask (2B, T)` u32 (right
    /// padding), `completion_mask (2B, T)` (1 at completion tokens). A row's prompt is its tokens
    /// before the first non-zero completion-mask position; its completion, the real tokens from
    /// there on.
    ///
    /// Errors: an odd row count, left padding or holes in `attention_mask`, a chosen and a
    /// rejected row whose prompts differ (pair and token named), an empty prompt.
    pub fn from_concatenated(input_ids: &Tensor, attention_mask: &Tensor, completion_mask: &Tensor) -> Result<Self> {
        match Self::try_from_concatenated(input_ids, attention_mask, completion_mask)? {
            Ok(s) => Ok(s),
            Err(why) => candle_core::bail!("{why}"),
        }
    }

    /// [`SharedPromptBatch::from_concatenated`] that tells a batch which cannot share its prompts
    /// apart from a malformed one: `Ok(Err(reason))` when a chosen and a rejected row have
    /// different prompts (pair and lengths named) or a pair has an empty prompt (the first token
    /// is a completion token: nothing to share, and no position before it to score it from);
    /// `Err` for malformed input (shapes, odd row count, left padding or holes).
    pub fn try_from_concatenated(input_ids: &Tensor, attention_mask: &Tensor, completion_mask: &Tensor) -> Result<std::result::Result<Self, String>> {
        let (n, t) = input_ids.dims2()?;
        if attention_mask.dims() != [n, t] || completion_mask.dims() != [n, t] {
            candle_core::bail!("shared prompt: attention_mask {:?} / completion_mask {:?} differ from input_ids ({n}, {t})", attention_mask.dims(), completion_mask.dims());
        }
        if n % 2 != 0 || n == 0 {
            candle_core::bail!("shared prompt: expected [chosen; rejected] rows, got {n}");
        }
        let b = n / 2;
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let am = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let cm = completion_mask.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut len = vec![0; n];
        let mut plen = vec![0; n];
        for r in 0..n {
            len[r] = am[r].iter().take_while(|&&m| m == 1).count();
            if am[r][len[r]..].iter().any(|&m| m != 0) {
                candle_core::bail!("shared prompt: row {r}: attention_mask is not right-padded (a real token after padding)");
            }
            plen[r] = cm[r].iter().position(|&m| m != 0.0).unwrap_or(len[r]).min(len[r]);
        }
        for p in 0..b {
            let (c, r) = (p, b + p);
            if plen[c] != plen[r] || ids[c][..plen[c]] != ids[r][..plen[r]] {
                return Ok(Err(format!("shared prompt: pair {p}: the chosen and rejected prompts differ (lengths {} and {})", plen[c], plen[r])));
            }
            if plen[c] == 0 {
                return Ok(Err(format!("shared prompt: pair {p} has an empty prompt (use the concatenated path)")));
            }
        }
        let tp = plen[..b].iter().copied().max().unwrap_or(0);
        let tc = (0..n).map(|r| len[r] - plen[r]).max().unwrap_or(0).max(1);
        let (mut pid, mut pm) = (vec![0u32; b * tp], vec![0u32; b * tp]);
        for p in 0..b {
            for i in 0..plen[p] {
                pid[p * tp + i] = ids[p][i];
                pm[p * tp + i] = 1;
            }
        }
        let (mut cid, mut ca) = (vec![0u32; n * tc], vec![0u32; n * tc]);
        let mut cw = vec![vec![0f64; tc]; n];
        for r in 0..n {
            for j in 0..len[r] - plen[r] {
                let at = plen[r] + j;
                cid[r * tc + j] = ids[r][at];
                ca[r * tc + j] = 1;
                cw[r][j] = cm[r][at];
            }
        }
        let dev = input_ids.device();
        Ok(Ok(Self {
            prompt_ids: Tensor::from_vec(pid, (b, tp), dev)?,
            prompt_mask: Tensor::from_vec(pm, (b, tp), dev)?,
            prompt_lens: plen[..b].to_vec(),
            completion_ids: Tensor::from_vec(cid, (n, tc), dev)?,
            completion_attn: Tensor::from_vec(ca, (n, tc), dev)?,
            completion_weights: cw,
        }))
    }

    /// The additive attention bias of the completion queries, `(2B, 1, Tc, Tp + Tc)`: key `j < Tp`
    /// (prompt of the row's pair) is open iff it is a real prompt token; key `Tp + i` iff
    /// `i <= query` and completion token `i` is real. Blocked entries get [`MASK_VALUE`]. With a
    /// sliding `window` W, a key also needs to be among the query's last W positions (query `q`
    /// at position `lp + q`, prompt key `j` at `j`, completion key `i` at `lp + i`; as
    /// [`crate::model::ops::attention_bias_windowed`]).
    pub fn completion_bias(&self, dtype: DType, window: Option<usize>) -> Result<Tensor> {
        let (b, tp) = self.prompt_ids.dims2()?;
        let (n, tc) = self.completion_ids.dims2()?;
        let pm = self.prompt_mask.to_vec2::<u32>()?;
        let ca = self.completion_attn.to_vec2::<u32>()?;
        let tk = tp + tc;
        let w = window.unwrap_or(usize::MAX);
        let mut bias = vec![MASK_VALUE; n * tc * tk];
        for r in 0..n {
            let lp = self.prompt_lens[r % b];
            for q in 0..tc {
                let row = &mut bias[(r * tc + q) * tk..(r * tc + q + 1) * tk];
                for j in 0..tp {
                    if pm[r % b][j] == 1 && lp + q - j < w {
                        row[j] = 0.0;
                    }
                }
                for i in 0..=q {
                    if ca[r][i] == 1 && q - i < w {
                        row[tp + i] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(bias, (n, 1, tc, tk), self.prompt_ids.device())?.to_dtype(dtype)
    }
}

impl Model {
    /// Final hidden states (after `model.norm`) of a [`SharedPromptBatch`], each prompt run once:
    /// returns `(prompt hidden (B, Tp, D), completion hidden (2B, Tc, D))`. Completion row `r`
    /// continues the prompt of pair `r % B` at positions `lp..lp+Tc`.
    ///
    /// Equal (to rounding) to `forward_hidden` of the concatenated rows at the same positions;
    /// padded positions give finite, meaningless values.
    pub fn forward_hidden_shared_prompt(&self, batch: &SharedPromptBatch, use_adapters: bool) -> Result<(Tensor, Tensor)> {
        let (b, tp) = batch.prompt_ids.dims2()?;
        let (n, tc) = batch.completion_ids.dims2()?;
        if n != 2 * b {
            candle_core::bail!("shared prompt: {n} completion rows for {b} prompts");
        }
        let dtype = self.dtype();
        // per kind of layer (global, sliding): the prompt's and the completions' RoPE tables and biases
        let inputs = self.per_layer_kind(|sliding| {
            let window = self.window_for(sliding);
            let (cos_p, sin_p) = self.rope_tables_for(sliding, 0, tp)?;
            let bias_p = crate::model::ops::attention_bias_windowed(Some(&batch.prompt_mask), tp, 0, window, dtype, self.device())?;
            let mut cos = Vec::with_capacity(n);
            let mut sin = Vec::with_capacity(n);
            for r in 0..n {
                let (c, s) = self.rope_tables_for(sliding, batch.prompt_lens[r % b], tc)?;
                cos.push(c);
                sin.push(s);
            }
            let (cos_c, sin_c) = (Tensor::stack(&cos, 0)?, Tensor::stack(&sin, 0)?); // (2B, Tc, hd)
            Ok([(cos_p, sin_p, bias_p), (cos_c, sin_c, batch.completion_bias(dtype, window)?)])
        })?;
        let mut xp = self.embed(&batch.prompt_ids)?;
        let mut xc = self.embed(&batch.completion_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let [(cos_p, sin_p, bias_p), (cos_c, sin_c, bias_c)] = inputs[self.is_sliding(i) as usize].as_ref().expect("made for every kind of layer");
            let mut slot = None;
            xp = layer.forward(&xp, cos_p, sin_p, Some(bias_p), Some(&mut slot), use_adapters)?;
            let (kp, vp) = slot.ok_or_else(|| candle_core::Error::Msg("shared prompt: no prompt keys".into()))?;
            // each pair's prompt K,V serve its chosen row and its rejected row
            let mut slot_c = Some((Tensor::cat(&[&kp, &kp], 0)?, Tensor::cat(&[&vp, &vp], 0)?));
            xc = layer.forward(&xc, cos_c, sin_c, Some(bias_c), Some(&mut slot_c), use_adapters)?;
        }
        Ok((self.final_norm(&xp)?, self.final_norm(&xc)?))
    }
}

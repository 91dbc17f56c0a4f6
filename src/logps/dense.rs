//! The dense path, and the definition the others are checked against: logits for every
//! position `(N, T, V)`, a log-softmax over the whole vocabulary, the entries at the completion
//! targets summed (TRL 1.16 `DPOTrainer._compute_loss`).
//!
//! Legend: N sequences, T positions, V vocabulary.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};


/// Log-softmax of `logits` picked at `targets`: `log_softmax(logits)[.., targets]`.
///
/// Shapes: `logits (..., V)`, `targets (...)` u32 → `(...)` in the dtype of `logits`.
/// Equivalent to `log_softmax(logits, -1).gather(targets)` (TRL's `selective_log_softmax`),
/// computed as `logits[target] - logsumexp(logits)` with the row maximum subtracted first (the
/// maximum is detached: logsumexp does not depend on the shift, so the gradient is exact).
/// Differentiable with respect to `logits` (only composed candle ops; never the fused softmax).
/// This is the building block a later speed-up can call on the LM-head rows of completion
/// positions only.
pub fn selective_log_softmax(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach(); // (..., 1)
    let shifted = logits.broadcast_sub(&max)?; // (..., V)
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (..., 1)
    let idx = targets.unsqueeze(D::Minus1)?.contiguous()?; // (..., 1)
    let picked = shifted.gather(&idx, D::Minus1)?; // (..., 1)
    Ok((picked - lse)?.squeeze(D::Minus1)?)
}

/// Summed completion log-probs of each sequence.
///
/// `logps[n] = Σ_t completion_mask[n,t] · log_softmax(logits[n,t-1])[input_ids[n,t]]` for
/// `t = 1..T` (position 0 has no prediction and is ignored, as TRL's shift does).
///
/// Shapes and dtypes: `logits (N,T,V)` any float dtype, `input_ids (N,T)` u32,
/// `completion_mask (N,T)` (1 at completion tokens) → `(N,)`, in nats. Computed and returned in
/// f32 (f16/bf16/f32 logits) or f64 (f64 logits, for finite-difference gradient checks).
/// Errors: shape mismatches, and token ids outside the vocabulary (named).
/// Source: TRL 1.16 `DPOTrainer._compute_loss` (`per_token_logps[shift_completion_mask == 0] = 0`,
/// then `sum(dim=1)`); masked positions contribute exactly 0 even if their log-prob is not finite.
pub fn completion_logps(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor) -> Result<Tensor> {
    let (n, t, v) = logits.dims3()?;
    check_shape("input_ids", input_ids, &[n, t])?;
    check_shape("completion_mask", completion_mask, &[n, t])?;
    let dtype = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    if t < 2 {
        return Ok(Tensor::zeros(n, dtype, logits.device())?);
    }
    let max_id = input_ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
    if max_id as usize >= v {
        return Err(Error::Msg(format!("input_ids holds token id {max_id}, outside the vocabulary of {v} logits")));
    }
    let logits = logits.to_dtype(dtype)?.narrow(1, 0, t - 1)?; // (N, T-1, V): predicts tokens 1..T
    let targets = input_ids.narrow(1, 1, t - 1)?; // (N, T-1)
    let mask = completion_mask.to_dtype(dtype)?.narrow(1, 1, t - 1)?; // (N, T-1)
    let per_token = selective_log_softmax(&logits, &targets)?; // (N, T-1)
    let keep = mask.ne(0.0)?;
    let per_token = keep.where_cond(&per_token.broadcast_mul(&mask)?, &per_token.zeros_like()?)?;
    Ok(per_token.sum(1)?)
}

/// Number of completion tokens of each sequence: `Σ_t completion_mask[n,t]`, `(N,T)` → `(N,)` f32.
///
/// Counts every masked position, including `t = 0` (TRL's `completion_mask.sum(dim=1)`, used by
/// the length-normalised losses).
pub fn completion_token_counts(completion_mask: &Tensor) -> Result<Tensor> {
    Ok(completion_mask.to_dtype(DType::F32)?.sum(1)?)
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::Shape { name: name.into(), expected: expected.to_vec(), got: t.dims().to_vec() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    // completion_logps against a direct f64 computation on random logits, with a prompt part,
    // a completion and right padding (token ids at padded positions are arbitrary).
    #[test]
    fn completion_logps_matches_direct_sum() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, t, v) = (4usize, 6usize, 11usize);
        let logits: Vec<f32> = (0..n * t * v).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        let ids: Vec<u32> = (0..n * t).map(|_| rng.random_range(0..v as u32)).collect();
        // row n: prompt of 2 tokens, then completion of length 1 + n, then padding
        let mut mask = vec![0f32; n * t];
        for row in 0..n {
            for pos in 2..(3 + row).min(t) {
                mask[row * t + pos] = 1.0;
            }
        }
        let lt = Tensor::from_vec(logits.clone(), (n, t, v), &Device::Cpu).unwrap();
        let it = Tensor::from_vec(ids.clone(), (n, t), &Device::Cpu).unwrap();
        let mt = Tensor::from_vec(mask.clone(), (n, t), &Device::Cpu).unwrap();
        let got = completion_logps(&lt, &it, &mt).unwrap().to_vec1::<f32>().unwrap();
        for row in 0..n {
            let mut want = 0f64;
            for pos in 1..t {
                if mask[row * t + pos] == 0.0 {
                    continue;
                }
                let l = &logits[(row * t + pos - 1) * v..(row * t + pos) * v];
                let lse = l.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
                want += l[ids[row * t + pos] as usize] as f64 - lse;
            }
            // f32 log-softmax of O(1) logits: ~1e-6 per token, a handful of tokens.
            assert!((got[row] as f64 - want).abs() < 1e-5, "row {row}: {} vs {want}", got[row]);
        }
        let counts = completion_token_counts(&mt).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(counts, vec![1.0, 2.0, 3.0, 4.0]);
    }

    // The gradient of completion_logps with respect to the logits is onehot(target) - softmax
    // at completion positions (shifted by one) and exactly 0 elsewhere; the analytic form is
    // evaluated in f64; 1e-6 is f32 rounding of softmax values below 1.
    #[test]
    fn completion_logps_gradient_is_onehot_minus_softmax() {
        let (n, t, v) = (2usize, 4usize, 5usize);
        let vals: Vec<f32> = (0..n * t * v).map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0).collect();
        let var = Var::from_vec(vals.clone(), (n, t, v), &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 3, 1, 4], [2, 2, 0, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f32, 0., 1., 1.], [0., 1., 1., 0.]], &Device::Cpu).unwrap();
        let lp = completion_logps(var.as_tensor(), &ids, &mask).unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let g = grads.get(var.as_tensor()).expect("no gradient for logits").flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ids_v = [[0u32, 3, 1, 4], [2, 2, 0, 1]];
        let mask_v = [[0f32, 0., 1., 1.], [0., 1., 1., 0.]];
        for row in 0..n {
            for pos in 0..t {
                let l = &vals[(row * t + pos) * v..(row * t + pos + 1) * v];
                let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
                let m = if pos + 1 < t { mask_v[row][pos + 1] } else { 0.0 };
                for k in 0..v {
                    let want = if m == 0.0 {
                        0.0
                    } else {
                        let onehot = if ids_v[row][pos + 1] as usize == k { 1.0 } else { 0.0 };
                        onehot - (l[k] as f64).exp() / z
                    };
                    let got = g[(row * t + pos) * v + k] as f64;
                    assert!((got - want).abs() < 1e-6, "grad[{row},{pos},{k}] = {got}, want {want}");
                }
            }
        }
    }

    #[test]
    fn completion_logps_rejects_bad_input() {
        let logits = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 1, 2], [3, 0, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let bad_mask = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
        let e = completion_logps(&logits, &ids, &bad_mask).unwrap_err().to_string();
        assert!(e.contains("completion_mask"), "{e}");
        let big = Tensor::new(&[[0u32, 1, 9], [3, 0, 1]], &Device::Cpu).unwrap();
        let e = completion_logps(&logits, &big, &mask).unwrap_err().to_string();
        assert!(e.contains("token id 9"), "{e}");
        // uniform logits: every completion token has log-prob -ln 4
        let lp = completion_logps(&logits, &ids, &mask).unwrap().to_vec1::<f32>().unwrap();
        for x in lp {
            assert!((x + 2.0 * 4f32.ln()).abs() < 1e-6);
        }
    }
}

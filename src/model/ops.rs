//! Differentiable building blocks of the Llama-family decoder.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and `rotary_emb::rope*` have no backward pass
//! (see `../shared/docs/candle-notes.md`): gradients silently stop at them. Everything here is
//! composed from ops that candle can differentiate, so `loss.backward()` reaches every weight.
//!
//! Dimension legend: N batch rows, T query positions, Tk key positions, H heads, hd head dim,
//! D hidden width.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::model::config::Llama3RopeScaling;

/// The additive value for a blocked attention entry.
///
/// Finite on purpose: a query row whose keys are all blocked (a row with no real token at all)
/// then gets a uniform, finite softmax instead of `NaN` (`-inf - (-inf)`).
pub const MASK_VALUE: f64 = -1e9;

/// Root-mean-square layer norm, `y = x / sqrt(mean(x^2) + eps) * w`, over the last dim.
///
/// `x` `(..., D)`, `weight` `(D,)`; returns `(..., D)` in the dtype of `x`.
/// Source: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; HF
/// `LlamaRMSNorm.forward` (`modeling_llama.py`). Composed from differentiable ops (candle's
/// `ops::rms_norm` has no backward).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    // (..., 1): 1 / sqrt(mean_d x_d^2 + eps)
    let inv_rms = x.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension, `y_i = exp(x_i - m) / sum_j exp(x_j - m)`, differentiable.
///
/// `m = max_j x_j` is detached: softmax is invariant to a constant shift, so the gradient is
/// exact and candle skips the backward of the `max` reduction. `x` `(..., K)` -> `(..., K)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// The RoPE inverse frequencies `inv_freq_i = theta^(-2i/hd)`, `i = 0..hd/2`, with the Llama-3
/// frequency scaling applied when `scaling` is given.
///
/// Source: Su et al. 2021, "RoFormer" (arXiv 2104.09864); HF
/// `modeling_rope_utils._compute_default_rope_parameters` and `_compute_llama3_parameters`:
/// wavelengths `2 pi / f` shorter than `orig / high_freq_factor` keep `f`, longer than
/// `orig / low_freq_factor` become `f / factor`, and the ones in between are interpolated with
/// `s = (orig / wavelen - low) / (high - low)`, `f' = (1 - s) f / factor + s f`.
///
/// With `hf_f32` the base frequencies are computed in f32 as HF does (its tables are f32).
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>, hf_f32: bool) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f64 / head_dim as f64;
            if hf_f32 {
                (1.0f32 / (theta as f32).powf(e as f32)) as f64
            } else {
                1.0 / theta.powf(e)
            }
        })
        .collect();
    let Some(s) = scaling else { return base };
    let orig = s.original_max_position_embeddings as f64;
    let low_wavelen = orig / s.low_freq_factor;
    let high_wavelen = orig / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .map(|f| if hf_f32 { f as f32 as f64 } else { f })
        .collect()
}

/// The `cos` and `sin` tables of positions `start..start+len`, each `(len, hd)` in HF's
/// half-rotation layout: column `i` and `i + hd/2` share the frequency `inv_freq_i`
/// (`emb = cat(freqs, freqs)` in HF `LlamaRotaryEmbedding`).
///
/// In F32 the angle `pos * inv_freq` is rounded to f32 before `cos`/`sin`, as HF computes it.
pub fn rope_tables(inv_freq: &[f64], start: usize, len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let hd = 2 * half;
    let mut cos = Vec::with_capacity(len * hd);
    let mut sin = Vec::with_capacity(len * hd);
    for p in start..start + len {
        let angles: Vec<f64> = inv_freq
            .iter()
            .map(|&f| if dtype == DType::F64 { p as f64 * f } else { (p as f32 * f as f32) as f64 })
            .collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
        }
    }
    let cos = Tensor::from_vec(cos, (len, hd), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, hd), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// `rotate_half(x) = cat(-x[..., hd/2..], x[..., ..hd/2])` (HF `modeling_llama.rotate_half`).
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd - hd / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary position embedding, `x * cos + rotate_half(x) * sin` (HF `apply_rotary_pos_emb`).
///
/// `x` `(N, H, T, hd)`, `cos`/`sin` `(T, hd)` from [`rope_tables`]; returns `(N, H, T, hd)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// The additive attention bias `(N, 1, T, past + T)`: 0 where query `i` may attend key `j`,
/// [`MASK_VALUE`] where it may not.
///
/// Query `i` sits at absolute position `past + i`; it sees key `j` iff `j <= past + i` (causal)
/// and `key_mask[n, j] == 1` (not padding). `key_mask` is the `(N, past + T)` u32 attention mask
/// (1 = real token); `None` means every key is real, and then the batch dim of the result is 1.
/// Built on the host from the 0/1 mask (no `cumsum`, which is a huge matmul in candle).
pub fn attention_bias(
    key_mask: Option<&Tensor>,
    t: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let tk = past + t;
    let rows: Vec<Vec<u32>> = match key_mask {
        Some(m) => {
            let (n, mk) = m.dims2()?;
            if mk != tk {
                candle_core::bail!("attention_mask has {mk} positions, expected {tk} (past {past} + new {t}); shape ({n}, {mk})");
            }
            m.to_dtype(DType::U32)?.to_vec2::<u32>()?
        }
        None => vec![vec![1; tk]],
    };
    let n = rows.len();
    let mut bias = Vec::with_capacity(n * t * tk);
    for row in &rows {
        for i in 0..t {
            for (j, &real) in row.iter().enumerate() {
                bias.push(if j <= past + i && real == 1 { 0.0 } else { MASK_VALUE });
            }
        }
    }
    Tensor::from_vec(bias, (n, 1, t, tk), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn t64(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_values_and_gradient() -> Result<()> {
        // x = [3, 4]: mean(x^2) = 12.5, y = x / sqrt(12.5 + eps) * w
        let x = Var::from_tensor(&t64(&[3.0, 4.0], &[1, 2]))?;
        let w = Var::from_tensor(&t64(&[1.0, 2.0], &[2]))?;
        let y = rms_norm(x.as_tensor(), w.as_tensor(), 0.0)?;
        let r = 12.5f64.sqrt();
        let got = y.to_vec2::<f64>()?;
        assert!((got[0][0] - 3.0 / r).abs() < 1e-12 && (got[0][1] - 8.0 / r).abs() < 1e-12);
        // d(sum y)/dw_d = x_d / r; d(sum y)/dx_k = w_k / r - x_k (sum_d w_d x_d) / (D r^3)
        let g = y.sum_all()?.backward()?;
        let gw = g.get(w.as_tensor()).expect("grad w").to_vec1::<f64>()?;
        assert!((gw[0] - 3.0 / r).abs() < 1e-12 && (gw[1] - 4.0 / r).abs() < 1e-12);
        let gx = g.get(x.as_tensor()).expect("grad x").to_vec2::<f64>()?;
        let s = 3.0 * 1.0 + 4.0 * 2.0;
        for (k, (xk, wk)) in [(3.0, 1.0), (4.0, 2.0)].into_iter().enumerate() {
            let want = wk / r - xk * s / (2.0 * r * r * r);
            assert!((gx[0][k] - want).abs() < 1e-12, "dx_{k}: {} vs {want}", gx[0][k]);
        }
        Ok(())
    }

    #[test]
    fn softmax_values_and_gradient() -> Result<()> {
        let x = Var::from_tensor(&t64(&[1.0, 2.0, 3.0, 0.5, 0.5, MASK_VALUE], &[2, 3]))?;
        let y = softmax_last_dim(x.as_tensor())?;
        let got = y.to_vec2::<f64>()?;
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (k, v) in [1.0f64, 2.0, 3.0].iter().enumerate() {
            assert!((got[0][k] - v.exp() / z).abs() < 1e-12);
        }
        assert_eq!(got[1], vec![0.5, 0.5, 0.0]);
        // loss = sum_k c_k y_k: dL/dx_k = y_k (c_k - sum_j c_j y_j)
        let c = t64(&[1.0, -2.0, 0.5, 3.0, 1.0, 7.0], &[2, 3]);
        let g = (y.clone() * &c)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("grad x").to_vec2::<f64>()?;
        let cv = c.to_vec2::<f64>()?;
        for r in 0..2 {
            let dot: f64 = (0..3).map(|j| cv[r][j] * got[r][j]).sum();
            for k in 0..3 {
                let want = got[r][k] * (cv[r][k] - dot);
                assert!((gx[r][k] - want).abs() < 1e-12, "row {r} col {k}: {} vs {want}", gx[r][k]);
            }
        }
        Ok(())
    }

    #[test]
    fn rope_rotates_pairs_and_is_differentiable() -> Result<()> {
        // hd = 4, theta = 100: inv_freq = [1, 0.1]; position 2: angles [2, 0.2]
        let inv = rope_inv_freq(4, 100.0, None, false);
        assert!((inv[0] - 1.0).abs() < 1e-15 && (inv[1] - 0.1).abs() < 1e-15);
        let (cos, sin) = rope_tables(&inv, 2, 1, DType::F64, &Device::Cpu)?;
        let xv = [1.0, 2.0, 3.0, 4.0];
        let x = Var::from_tensor(&t64(&xv, &[1, 1, 1, 4]))?;
        let y = rope(x.as_tensor(), &cos, &sin)?;
        let got = y.flatten_all()?.to_vec1::<f64>()?;
        // pair (0, 2) rotated by angle 2, pair (1, 3) by 0.2
        for (i, a) in [(0usize, 2.0f64), (1, 0.2)] {
            let (x1, x2) = (xv[i], xv[i + 2]);
            assert!((got[i] - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-12);
            assert!((got[i + 2] - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-12);
        }
        // a rotation: dL/dx = R^T c for L = c . (R x)
        let c = t64(&[0.3, -1.0, 2.0, 0.7], &[1, 1, 1, 4]);
        let g = (y * &c)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("grad x").flatten_all()?.to_vec1::<f64>()?;
        let cv = c.flatten_all()?.to_vec1::<f64>()?;
        for (i, a) in [(0usize, 2.0f64), (1, 0.2)] {
            let (c1, c2) = (cv[i], cv[i + 2]);
            assert!((gx[i] - (c1 * a.cos() + c2 * a.sin())).abs() < 1e-12);
            assert!((gx[i + 2] - (-c1 * a.sin() + c2 * a.cos())).abs() < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn llama3_scaling_bands() {
        // Llama-3.1 values; hd = 128, theta = 500000
        let s = Llama3RopeScaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
        let base = rope_inv_freq(128, 500000.0, None, false);
        let scaled = rope_inv_freq(128, 500000.0, Some(&s), false);
        let two_pi = 2.0 * std::f64::consts::PI;
        let mut seen = [false; 3];
        for (f, g) in base.iter().zip(&scaled) {
            let wl = two_pi / f;
            if wl < 8192.0 / 4.0 {
                assert_eq!(f, g);
                seen[0] = true;
            } else if wl > 8192.0 {
                assert!((g - f / 8.0).abs() < 1e-18);
                seen[1] = true;
            } else {
                let sm = (8192.0 / wl - 1.0) / 3.0;
                assert!((g - ((1.0 - sm) * f / 8.0 + sm * f)).abs() < 1e-18);
                assert!(*g < *f && *g > f / 8.0);
                seen[2] = true;
            }
        }
        assert_eq!(seen, [true; 3], "every band is exercised");
    }

    #[test]
    fn attention_bias_causal_and_padding() -> Result<()> {
        let m = Tensor::new(&[[1u32, 1, 0], [1, 1, 1]], &Device::Cpu)?;
        let b = attention_bias(Some(&m), 3, 0, DType::F64, &Device::Cpu)?;
        assert_eq!(b.dims(), &[2, 1, 3, 3]);
        let f = b.flatten_all()?.to_vec1::<f64>()?;
        let x = MASK_VALUE;
        #[rustfmt::skip]
        let want = [0.0, x, x,  0.0, 0.0, x,  0.0, 0.0, x,
                    0.0, x, x,  0.0, 0.0, x,  0.0, 0.0, 0.0];
        assert_eq!(f, want);
        // with a cache of 2 positions, the new query (absolute position 2) sees keys 0..=2
        let c = attention_bias(None, 1, 2, DType::F32, &Device::Cpu)?;
        assert_eq!(c.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 0.0, 0.0]);
        assert!(attention_bias(Some(&m), 2, 0, DType::F32, &Device::Cpu).is_err());
        // padded query rows stay finite after softmax
        let s = softmax_last_dim(&Tensor::zeros((2, 1, 3, 3), DType::F64, &Device::Cpu)?.broadcast_add(&b)?)?;
        assert!(s.flatten_all()?.to_vec1::<f64>()?.iter().all(|v| v.is_finite()));
        Ok(())
    }
}

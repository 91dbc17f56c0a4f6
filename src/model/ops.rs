//! Differentiable building blocks of the Llama-family decoder.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and `rotary_emb::rope*` have no backward pass
//! (see `../shared/docs/candle-notes.md`): gradients silently stop at them. Here the hot ops
//! ([`rms_norm`], [`rope`], [`masked_softmax`]) are custom ops whose backward sits beside the
//! forward (CPU, F32/F64, rows in parallel with rayon, deterministic), each tested against a
//! version composed from differentiable candle ops ([`rms_norm_composed`], [`rope_composed`],
//! [`softmax_last_dim`]) on values and gradients.
//!
//! Dimension legend: N batch rows, T query positions, Tk key positions, H heads, hd head dim,
//! D hidden width.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::model::config::{Activation, Llama3RopeScaling};
use crate::model::reduce;

/// The additive value for a blocked attention entry.
///
/// Finite on purpose: a query row whose keys are all blocked (a row with no real token at all)
/// then gets a uniform, finite softmax instead of `NaN` (`-inf - (-inf)`).
pub const MASK_VALUE: f64 = -1e9;

/// Whether the decoder uses its fused layer ops (on by default): [`swiglu`], the attention
/// heads' layout ops ([`crate::model::heads`]), no-op reshapes kept out of the graph
/// ([`reshaped`]) and no weight gradient for constant norm weights. Off, every one of them takes
/// its composed candle path again: the plain path, kept for the equivalence tests and the
/// before/after benchmark.
static FUSED_LAYER_OPS: AtomicBool = AtomicBool::new(true);

/// Enables or disables the fused layer ops process-wide (see [`fused_layer_ops`]; results agree
/// to rounding, tests/fused_layer_ops.rs).
pub fn set_fused_layer_ops(enabled: bool) {
    FUSED_LAYER_OPS.store(enabled, Ordering::Relaxed);
}

/// Whether the fused layer ops are on (see [`set_fused_layer_ops`]).
pub fn fused_layer_ops() -> bool {
    FUSED_LAYER_OPS.load(Ordering::Relaxed)
}

/// `x.reshape(dims)`, but `x` itself (no autograd node) when it already has `dims`.
///
/// Every candle `reshape` is a graph node even when nothing changes, and each node's backward
/// allocates a zero gradient and adds into it (two passes over the activation). The adapter and
/// linear helpers flatten to `(rows, d)` and back; called on tensors that are already 2-D, this
/// keeps those no-op reshapes out of the graph. With the fused layer ops off
/// ([`set_fused_layer_ops`]) it always reshapes, as before.
pub fn reshaped(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if x.dims() == dims && fused_layer_ops() {
        Ok(x.clone())
    } else {
        x.reshape(dims)
    }
}

/// Flattens `x (..., d)` to rows `(rows, d)` with [`reshaped`] (no graph node when `x` is
/// already 2-D); returns the rows and `x`'s dims for [`from_rows`].
///
/// Errors: a scalar `x` (no last dimension).
pub fn to_rows(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let d = *dims.last().ok_or_else(|| candle_core::Error::Msg("to_rows: x is a scalar (no last dimension)".into()))?;
    Ok((reshaped(x, &[x.elem_count() / d.max(1), d])?, dims))
}

/// Rows `y (rows, k)` back to `dims` with the last dimension replaced by `k` (the inverse of
/// [`to_rows`] for a row-wise map from `d` to `k` features), by [`reshaped`].
pub fn from_rows(y: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let mut out = dims.to_vec();
    *out.last_mut().expect("to_rows dims have a last dimension") = y.dim(1)?;
    reshaped(y, &out)
}

/// Root-mean-square layer norm, `y = x / sqrt(mean(x^2) + eps) * w`, over the last dim.
///
/// `x` `(..., D)`, `weight` `(D,)`, both F32 or both F64; returns `(..., D)`.
/// Source: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; HF
/// `LlamaRMSNorm.forward` (`modeling_llama.py`). A custom op with its backward beside it
/// ([`RmsNormOp`]): candle's `ops::rms_norm` has no backward, and the composed version
/// ([`rms_norm_composed`]) costs about ten single-threaded broadcast passes in backward.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !crate::device::cpu_kernels(&x) {
        return rms_norm_composed(x, weight, eps); // the op runs on the CPU only
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormOp { eps })
}

/// The same function as [`rms_norm`] composed from differentiable candle ops (the reference the
/// custom op is tested against).
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    // (..., 1): 1 / sqrt(mean_d x_d^2 + eps)
    let inv_rms = x.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension, `y_i = exp(x_i - m) / sum_j exp(x_j - m)`, composed from
/// differentiable candle ops (the reference [`masked_softmax`] is tested against).
///
/// `m = max_j x_j` is detached: softmax is invariant to a constant shift, so the gradient is
/// exact and candle skips the backward of the `max` reduction. `x` `(..., K)` -> `(..., K)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// SwiGLU's gate, `silu(g) * u = g σ(g) u` element-wise, fused, with its backward beside it
/// ([`GluOp`] of [`Silu`]): `dL/dg = dy u σ(g) (1 + g (1 - σ(g)))`, `dL/du = dy g σ(g)`.
///
/// `g`, `u` `(..., I)` of one shape and dtype (F32/F64); returns `(..., I)`. Source: Shazeer
/// 2020, "GLU Variants Improve Transformer"; HF `LlamaMLP` (`act_fn(gate_proj(x)) *
/// up_proj(x)`). Replaces candle's `silu` and `mul`, whose backward takes about ten
/// single-threaded passes over the `(N, T, I)` activations (the composed reference:
/// [`swiglu_composed`]).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", g.dims(), u.dims());
    }
    if !crate::device::cpu_kernels(&g) {
        return swiglu_composed(g, u); // the op runs on the CPU only
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, GluOp::<Silu>::OP)
}

/// The same function as [`swiglu`] from differentiable candle ops: `silu(g) * u`.
pub fn swiglu_composed(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}

/// GeGLU's gate with the tanh approximation of GELU, `gelu_tanh(g) * u` element-wise, fused,
/// with its backward beside it ([`GluOp`] of [`GeluTanh`]):
/// `gelu_tanh(z) = z/2 (1 + tanh(a))`, `a = sqrt(2/pi) (z + 0.044715 z^3)`,
/// `dL/dg = dy u (1/2 (1 + tanh a) + z/2 (1 - tanh^2 a) sqrt(2/pi) (1 + 3 0.044715 z^2))`,
/// `dL/du = dy gelu_tanh(g)`.
///
/// `g`, `u` `(..., I)` of one shape and dtype (F32/F64); returns `(..., I)`. Source: Shazeer
/// 2020, "GLU Variants Improve Transformer"; Hendrycks & Gimpel 2016 (GELU); HF `GemmaMLP`
/// (`hidden_activation = "gelu_pytorch_tanh"`, PyTorch `gelu(approximate="tanh")`). The
/// composed reference: [`geglu_composed`].
pub fn geglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!("geglu: gate {:?} and up {:?} differ", g.dims(), u.dims());
    }
    if !crate::device::cpu_kernels(&g) {
        return geglu_composed(g, u); // the op runs on the CPU only
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, GluOp::<GeluTanh>::OP)
}

/// The same function as [`geglu`] from differentiable candle ops: candle's `gelu` (the tanh
/// approximation) times `u`.
pub fn geglu_composed(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.gelu()? * u
}

/// The gated MLP activation `act(g) * u` of `act`: [`swiglu`] or [`geglu`] (`composed`: their
/// candle twins, [`swiglu_composed`] / [`geglu_composed`]).
pub fn glu(g: &Tensor, u: &Tensor, act: Activation, composed: bool) -> Result<Tensor> {
    match (act, composed) {
        (Activation::Silu, false) => swiglu(g, u),
        (Activation::Silu, true) => swiglu_composed(g, u),
        (Activation::GeluTanh, false) => geglu(g, u),
        (Activation::GeluTanh, true) => geglu_composed(g, u),
    }
}

/// Soft-capping, `c tanh(x / c)` element-wise (Gemma 2's attention scores and logits), from
/// differentiable candle ops (`dL/dx = dy (1 - tanh^2(x / c))`). HF `Gemma2ForCausalLM.forward`
/// (`final_logit_softcapping`) and `eager_attention_forward` (`softcap`).
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    x.affine(1.0 / cap, 0.0)?.tanh()?.affine(cap, 0.0)
}

/// `softmax(scores + bias)` over the last dim, fused, with its backward
/// `dL/ds = y * (g - sum_j g_j y_j)` beside it ([`MaskedSoftmaxOp`]).
///
/// `scores` `(N, H, T, Tk)`; `bias` `(N or 1, 1, T, Tk)` from [`attention_bias`] or `None`;
/// one dtype (F32/F64). The bias is a constant (no gradient). Rows run in parallel.
pub fn masked_softmax(scores: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    match bias {
        None if !crate::device::cpu_kernels(&scores) => softmax_last_dim(&scores),
        None => scores.apply_op1(SoftmaxOp),
        Some(b) => {
            let (n, h, t, tk) = scores.dims4()?;
            let (nb, one, tb, tkb) = b.dims4()?;
            if one != 1 || tb != t || tkb != tk || (nb != 1 && nb != n) {
                candle_core::bail!("masked_softmax: bias {:?} does not fit scores ({n}, {h}, {t}, {tk})", b.dims());
            }
            if !crate::device::cpu_kernels(&scores) {
                return softmax_last_dim(&scores.broadcast_add(b)?); // the op runs on the CPU only
            }
            scores.apply_op2(&b.contiguous()?, MaskedSoftmaxOp)
        }
    }
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
/// `x` `(N, H, T, hd)`, `cos`/`sin` `(T, hd)` from [`rope_tables`] (constants, no gradient),
/// or per-row tables `(N, T, hd)` (row `n`'s queries at their own positions, e.g. completions
/// placed after prompts of different lengths); returns `(N, H, T, hd)`. A custom op
/// ([`RopeOp`]) whose backward is the inverse rotation.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !crate::device::cpu_kernels(&x) {
        return rope_composed(x, cos, sin); // the op runs on the CPU only
    }
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeOp)
}

/// The same function as [`rope`] composed from differentiable candle ops (the reference, and
/// the path off the CPU): `x (N, H, T, hd)` with tables `(T, hd)`, or per-row tables
/// `(N, T, hd)` (each batch row its own positions, [`rope`]'s second form), broadcast over the
/// heads.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = if cos.rank() == 3 && x.rank() == 4 { (cos.unsqueeze(1)?, sin.unsqueeze(1)?) } else { (cos.clone(), sin.clone()) };
    x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
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
    attention_bias_windowed(key_mask, t, past, None, dtype, device)
}

/// [`attention_bias`] of a sliding-window layer: with `window = Some(W)` query `i` (position
/// `past + i`) also needs `past + i - j < W`, so it sees at most the last `W` positions,
/// itself included (transformers `sliding_window_overlay`: `kv_idx > q_idx - W`). `None`: the
/// plain causal bias. Errors: as [`attention_bias`], a window of 0.
pub fn attention_bias_windowed(
    key_mask: Option<&Tensor>,
    t: usize,
    past: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if window == Some(0) {
        candle_core::bail!("attention_bias: a sliding window of 0 positions");
    }
    let w = window.unwrap_or(usize::MAX);
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
                bias.push(if j <= past + i && past + i - j < w && real == 1 { 0.0 } else { MASK_VALUE });
            }
        }
    }
    Tensor::from_vec(bias, (n, 1, t, tk), device)?.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------------
// Custom ops: forward and backward side by side (CPU, F32/F64, contiguous inputs).

/// The float types the kernels run on.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn zero() -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    /// `exp` of every element in place: vectorised for f32 ([`crate::model::vexp`]: < 2e-7
    /// relative, 0 below -87 and +inf above 88), libm's `exp` a value for f64 (the dtype of the
    /// gradient checks).
    fn exp_slice(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = x.exp());
    }
    /// The sum of a softmax row's `exp(x - max)` (values in `[0, 1]`), independent of exact
    /// zeros inserted among the terms (masked keys, wherever they sit): f32 in fixed point
    /// ([`reduce::sum_unit`]), f64 (the gradient checks' dtype) in order (adding an exact
    /// zero changes no float sum).
    fn sum_exp(v: &[Self]) -> Self {
        v.iter().fold(Self::zero(), |s, &x| s + x)
    }
}

impl Real for f32 {
    fn zero() -> Self {
        0.0
    }
    fn exp_slice(v: &mut [Self]) {
        crate::model::vexp::exp_in_place(v)
    }
    fn sum_exp(v: &[Self]) -> Self {
        reduce::sum_unit(v)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    /// `exp`, with the arguments whose result is exactly +0 answered without libm: below -104
    /// `expf` underflows to 0 (e^-104 < 2^-150, half the smallest subnormal), but through
    /// its slow error path (`__math_oflowf`, errno); the attention mask's -1e9 sends half of
    /// every causal score row there (measured: ~5% of a training step). Bit-identical.
    fn exp(self) -> Self {
        if self < -104.0 {
            0.0
        } else {
            f32::exp(self)
        }
    }
}

impl Real for f64 {
    fn zero() -> Self {
        0.0
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    /// `exp`; below -746 the result is exactly +0 (e^-746 < 2^-1075) without libm's
    /// underflow path (see the f32 case). Bit-identical.
    fn exp(self) -> Self {
        if self < -746.0 {
            0.0
        } else {
            f64::exp(self)
        }
    }
}

/// The contiguous data of a layout.
pub(crate) fn data<'a, T>(v: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `$body` on the slices of two (or three) same-dtype F32/F64 storages.
macro_rules! dispatch {
    ($op:expr, [$(($s:expr, $l:expr, $a:ident)),+], $body:expr) => {
        match ($($s),+) {
            #[allow(unused_parens)]
            ($(CpuStorage::F32($a)),+) => {
                $(let $a = data($a, $l, $op)?;)+
                CpuStorage::F32($body)
            }
            #[allow(unused_parens)]
            ($(CpuStorage::F64($a)),+) => {
                $(let $a = data($a, $l, $op)?;)+
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: F32 or F64 inputs of one dtype expected", $op),
        }
    };
}
pub(crate) use dispatch;

/// The bias rows and the map from a score row to its bias row.
type BiasRows<'a, T> = (&'a [T], &'a (dyn Fn(usize) -> usize + Sync));

/// Row softmax of `x + bias`; `bias_row(r)` is the bias row of row `r` (`None`: no bias).
/// One pass for the max, one for `exp` and the sum, one to normalise.
fn softmax_rows<T: Real>(x: &[T], k: usize, bias: Option<BiasRows<'_, T>>) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(k).zip(x.par_chunks(k)).enumerate().for_each(|(r, (o, xr))| {
        match bias {
            Some((b, row)) => {
                let br = &b[row(r) * k..(row(r) + 1) * k];
                for ((o, &x), &b) in o.iter_mut().zip(xr).zip(br) {
                    *o = x + b;
                }
            }
            None => o.copy_from_slice(xr),
        }
        softmax_in_place(o);
    });
    out
}

/// Softmax of one row in place: the max, `exp(x - max)` (vectorised, [`Real::exp_slice`]), the
/// sum ([`Real::sum_exp`]: the same bits wherever masked keys sit in the row), divide. Shared
/// by [`masked_softmax`]'s rows and the fused attention ([`crate::model::attention`]), so both
/// give the same bits for the same scores. Runs its AVX-512 build where the CPU has it (the
/// same operations).
pub(crate) fn softmax_in_place<T: Real>(row: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if reduce::avx512() {
            // SAFETY: the CPU supports AVX-512F (checked at run time just above).
            unsafe { softmax_avx512(row) };
            return;
        }
    }
    softmax_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512<T: Real>(row: &mut [T]) {
    softmax_portable(row)
}

#[inline(always)]
fn softmax_portable<T: Real>(row: &mut [T]) {
    let m = reduce::max(row);
    row.iter_mut().for_each(|v| *v = *v - m);
    T::exp_slice(row);
    let sum = T::sum_exp(row);
    for v in row.iter_mut() {
        *v = *v / sum;
    }
}

/// Softmax backward on rows: `dx_j = y_j (g_j - sum_i g_i y_i)`.
fn softmax_bwd_rows<T: Real>(y: &[T], g: &[T], k: usize) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(k).zip(y.par_chunks(k).zip(g.par_chunks(k))).for_each(|(o, (yr, gr))| {
        let dot = reduce::dot(yr, gr, T::zero());
        for ((o, &y), &g) in o.iter_mut().zip(yr).zip(gr) {
            *o = y * (g - dot);
        }
    });
    out
}

/// Fused row softmax without bias (the forward of [`masked_softmax`] with `bias = None`).
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "ropo-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = l.dims().last().copied().unwrap_or(1).max(1);
        let out = dispatch!(self.name(), [(s, l, x)], softmax_rows(x, k, None));
        Ok((out, l.shape().clone()))
    }

    /// `dL/dx = y * (g - rowsum(g * y))`.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxBwdOp)?))
    }
}

/// Fused `softmax(scores + bias)`; scores `(N, H, T, Tk)`, bias `(N or 1, 1, T, Tk)`.
pub struct MaskedSoftmaxOp;

impl CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "ropo-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h, t, tk) = l1.shape().dims4()?;
        let nb = l2.dims()[0];
        // row r of (N, H, T) -> bias row (n or 0, i)
        let row = move |r: usize| if nb == 1 { r % t } else { (r / (h * t)) * t + r % t };
        let out = dispatch!(self.name(), [(s1, l1, x), (s2, l2, b)], softmax_rows(x, tk, Some((b, &row))));
        Ok((out, l1.shape().clone()))
    }

    /// `dL/dscores = y * (g - rowsum(g * y))`; the bias is a constant.
    fn bwd(&self, _scores: &Tensor, _bias: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxBwdOp)?), None))
    }
}

/// `(y, g) -> y * (g - rowsum(g * y))`, the softmax backward (no backward of its own).
struct SoftmaxBwdOp;

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "ropo-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = l1.dims().last().copied().unwrap_or(1).max(1);
        let out = dispatch!(self.name(), [(s1, l1, y), (s2, l2, g)], softmax_bwd_rows(y, g, k));
        Ok((out, l1.shape().clone()))
    }
}

/// `r = (mean_d x_d^2 + eps)^(-1/2)` of one row, accumulated in f64.
fn inv_rms<T: Real>(x: &[T], eps: f64) -> f64 {
    let ss = reduce::sum_f64(x, |v| v.to_f64() * v.to_f64());
    1.0 / (ss / x.len() as f64 + eps).sqrt()
}

/// RMSNorm forward on rows: `y = x * r * w`.
fn rms_norm_rows<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xr)| {
        let r = T::from_f64(inv_rms(xr, eps));
        for ((o, &x), &w) in o.iter_mut().zip(xr).zip(w) {
            *o = x * r * w;
        }
    });
    out
}

/// RMSNorm input gradient on rows: `dL/dx_k = r g_k w_k - x_k r^3 / D * sum_d g_d w_d x_d`
/// (from `dr/dx_k = -r^3 x_k / D`).
fn rms_norm_bwd_rows<T: Real>(x: &[T], g: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d).zip(g.par_chunks(d))).for_each(|(o, (xr, gr))| {
        let r = inv_rms(xr, eps);
        let dot = reduce::sum3_f64(xr, gr, w, |x, g, w| x.to_f64() * g.to_f64() * w.to_f64());
        let c = T::from_f64(r * r * r * dot / d as f64);
        let r = T::from_f64(r);
        for (((o, &x), &g), &w) in o.iter_mut().zip(xr).zip(gr).zip(w) {
            *o = r * g * w - x * c;
        }
    });
    out
}

/// RMSNorm `(x (..., D), w (D,)) -> x * r * w`, `r = (mean_d x_d^2 + eps)^(-1/2)` per row,
/// the sum of squares accumulated in f64.
pub struct RmsNormOp {
    /// Added to the mean square (`rms_norm_eps`).
    pub eps: f64,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "ropo-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l2.shape().elem_count();
        if l2.dims().len() != 1 || l1.dims().last() != Some(&d) {
            candle_core::bail!("rms_norm: weight {:?} does not fit input {:?}", l2.dims(), l1.dims());
        }
        let eps = self.eps;
        let out = dispatch!(self.name(), [(s1, l1, x), (s2, l2, w)], rms_norm_rows(x, w, eps));
        Ok((out, l1.shape().clone()))
    }

    /// `dL/dx` by [`RmsNormBwdOp`]; `dL/dw_d = sum_rows g_d x_d r` by candle ops (a sum over
    /// rows in a fixed order, so the result is deterministic), only when `w` is tracked by
    /// autograd (a `Var` or computed from one); a constant weight gets `None`.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let gx = x.apply_op3_no_bwd(&g, w, &RmsNormBwdOp { eps: self.eps })?;
        if !w.track_op() && fused_layer_ops() {
            // A constant weight (every norm of an adapter run): its gradient would be discarded.
            return Ok((Some(gx), None));
        }
        let d = w.elem_count();
        let r = x.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, self.eps)?.sqrt()?.recip()?;
        let gw = (g * x)?.broadcast_mul(&r)?.reshape((x.elem_count() / d.max(1), d))?.sum(0)?;
        Ok((Some(gx), Some(gw)))
    }
}

/// `(x (..., D), g (..., D), w (D,)) -> dL/dx (..., D)` of [`RmsNormOp`].
struct RmsNormBwdOp {
    eps: f64,
}

impl CustomOp3 for RmsNormBwdOp {
    fn name(&self) -> &'static str {
        "ropo-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let eps = self.eps;
        let out = dispatch!(self.name(), [(s1, l1, x), (s2, l2, g), (s3, l3, w)], rms_norm_bwd_rows(x, g, w, eps));
        Ok((out, l1.shape().clone()))
    }
}

/// Elements per parallel chunk of the element-wise kernels (64 KiB of f32).
const CHUNK: usize = 16 * 1024;

/// SwiGLU forward, element-wise: `y = g σ(g) u`.
pub(crate) fn swiglu_rows<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    let one = T::from_f64(1.0);
    out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(o, (gc, uc))| {
        // exp(-g) for the whole chunk first (vectorised, Real::exp_slice), then σ = 1 / (1 + e)
        o.iter_mut().zip(gc).for_each(|(o, &g)| *o = T::zero() - g);
        T::exp_slice(o);
        for ((o, &g), &u) in o.iter_mut().zip(gc).zip(uc) {
            *o = g * (one / (one + *o)) * u;
        }
    });
    out
}

/// SwiGLU backward: `[dL/dg ; dL/du]` concatenated (`2 len` values), `dL/dg = dy u σ (1 + g (1 - σ))`,
/// `dL/du = dy g σ`.
fn swiglu_bwd_rows<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let one = T::from_f64(1.0);
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK))).for_each(
        |((dgc, duc), ((gc, uc), yc))| {
            // exp(-g) for the chunk into du first (vectorised), then σ = 1 / (1 + e)
            duc.iter_mut().zip(gc).for_each(|(d, &g)| *d = T::zero() - g);
            T::exp_slice(duc);
            for ((((dg, du), &g), &u), &dy) in dgc.iter_mut().zip(duc.iter_mut()).zip(gc).zip(uc).zip(yc) {
                let s = one / (one + *du);
                *dg = dy * u * s * (one + g * (one - s));
                *du = dy * g * s;
            }
        },
    );
    out
}

/// `sqrt(2 / pi)` and the cubic coefficient of the tanh GELU (PyTorch `gelu(approximate="tanh")`).
const GELU_K: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

/// GeGLU forward, element-wise: `y = gelu_tanh(g) u`.
fn geglu_rows<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    let (half, one, k, c) = (T::from_f64(0.5), T::from_f64(1.0), T::from_f64(GELU_K), T::from_f64(GELU_C));
    out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(o, (gc, uc))| {
        for ((o, &g), &u) in o.iter_mut().zip(gc).zip(uc) {
            let t = (k * (g + c * g * g * g)).tanh();
            *o = half * g * (one + t) * u;
        }
    });
    out
}

/// GeGLU backward: `[dL/dg ; dL/du]` concatenated (`2 len` values), see [`geglu`].
fn geglu_bwd_rows<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let (half, one, k, c) = (T::from_f64(0.5), T::from_f64(1.0), T::from_f64(GELU_K), T::from_f64(GELU_C));
    let three_c = T::from_f64(3.0 * GELU_C);
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK))).for_each(
        |((dgc, duc), ((gc, uc), yc))| {
            for ((((dg, du), &g), &u), &dy) in dgc.iter_mut().zip(duc.iter_mut()).zip(gc).zip(uc).zip(yc) {
                let t = (k * (g + c * g * g * g)).tanh();
                let dgelu = half * (one + t) + half * g * (one - t * t) * k * (one + three_c * g * g);
                *dg = dy * u * dgelu;
                *du = dy * half * g * (one + t);
            }
        },
    );
    out
}

/// The element-wise rows of a gated activation `act(g) u`: forward and both input gradients.
pub(crate) trait GatedActivation: Send + Sync + 'static {
    /// The forward op's name (the backward's is `{NAME}-bwd`).
    const NAME: &'static str;
    /// The backward op's name.
    const BWD_NAME: &'static str;
    /// `act(g) u`, element-wise.
    fn rows<T: Real>(g: &[T], u: &[T]) -> Vec<T>;
    /// `[dL/dg ; dL/du]` concatenated (`2 len` values) for the upstream gradient `dy`.
    fn bwd_rows<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T>;
}

/// SwiGLU's activation (`silu`), for [`GluOp`].
pub(crate) struct Silu;

impl GatedActivation for Silu {
    const NAME: &'static str = "ropo-swiglu";
    const BWD_NAME: &'static str = "ropo-swiglu-bwd";
    fn rows<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
        swiglu_rows(g, u)
    }
    fn bwd_rows<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
        swiglu_bwd_rows(g, u, dy)
    }
}

/// GeGLU's activation (tanh GELU), for [`GluOp`].
pub(crate) struct GeluTanh;

impl GatedActivation for GeluTanh {
    const NAME: &'static str = "ropo-geglu";
    const BWD_NAME: &'static str = "ropo-geglu-bwd";
    fn rows<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
        geglu_rows(g, u)
    }
    fn bwd_rows<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
        geglu_bwd_rows(g, u, dy)
    }
}

/// A gated activation `(g (..., I), u (..., I)) -> act(g) u` of `A` ([`Silu`]: [`swiglu`],
/// [`GeluTanh`]: [`geglu`]).
pub(crate) struct GluOp<A>(std::marker::PhantomData<A>);

impl<A> GluOp<A> {
    pub(crate) const OP: Self = Self(std::marker::PhantomData);
}

impl<A: GatedActivation> CustomOp2 for GluOp<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!("{}: gate {:?} and up {:?} differ", A::NAME, l1.dims(), l2.dims());
        }
        let out = dispatch!(self.name(), [(s1, l1, g), (s2, l2, u)], A::rows(g, u));
        Ok((out, l1.shape().clone()))
    }

    /// Both input gradients from one pass ([`GluBwdOp`], `(2, ...)`), split by `get` (views, no
    /// copy).
    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &grad_res.contiguous()?, &GluBwdOp::<A>::OP)?; // (2, ...)
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `(g, u, dy) -> [dL/dg ; dL/du]`, shape `(2, ...)`, of [`GluOp`].
pub(crate) struct GluBwdOp<A>(std::marker::PhantomData<A>);

impl<A> GluBwdOp<A> {
    pub(crate) const OP: Self = Self(std::marker::PhantomData);
}

impl<A: GatedActivation> CustomOp3 for GluBwdOp<A> {
    fn name(&self) -> &'static str {
        A::BWD_NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(self.name(), [(s1, l1, g), (s2, l2, u), (s3, l3, dy)], A::bwd_rows(g, u, dy));
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// RoPE on rows of `hd`: row `r` of `(N, H, T)` is at position `r % T`;
/// `y_i = x_i cos_i - x_{i+hd/2} sin_i`, `y_{i+hd/2} = x_{i+hd/2} cos_{i+hd/2} + x_i sin_{i+hd/2}`
/// (`x cos + rotate_half(x) sin`).
fn rope_rows<T: Real>(x: &[T], cos: &[T], sin: &[T], hd: usize, h: usize, t: usize, per_row: bool) -> Vec<T> {
    let half = hd / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(hd).zip(x.par_chunks(hd)).enumerate().for_each(|(r, (o, xr))| {
        // table row: position r % T, of batch row r / (H T) when the tables are per row
        let p = if per_row { (r / (h * t)) * t + r % t } else { r % t };
        let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
        for i in 0..half {
            let (x1, x2) = (xr[i], xr[i + half]);
            o[i] = x1 * c[i] - x2 * s[i];
            o[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
    });
    out
}

/// Rotary embedding `(x (N, H, T, hd), cos (T, hd), sin (T, hd)) -> x cos + rotate_half(x) sin`.
///
/// Backward: the rotation's transpose, the same op with `-sin` (the tables are constants).
pub struct RopeOp;

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "ropo-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, t, hd) = l1.shape().dims4()?;
        let per_row = l2.dims().len() == 3;
        let fits = |d: &[usize]| d == [t, hd] || d == [n, t, hd];
        if !fits(l2.dims()) || l3.dims() != l2.dims() || hd % 2 != 0 {
            candle_core::bail!("rope: tables {:?}/{:?} do not fit x {:?} (need (T, hd) or (N, T, hd), hd even)", l2.dims(), l3.dims(), l1.dims());
        }
        let out = dispatch!(self.name(), [(s1, l1, x), (s2, l2, c), (s3, l3, s)], rope_rows(x, c, s, hd, h, t, per_row));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, cos: &Tensor, sin: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = grad_res.contiguous()?.apply_op3_no_bwd(cos, &sin.neg()?, &RopeOp)?;
        Ok((Some(gx), None, None))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Var;

    fn t64(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    /// Seeded N(0, 1) values.
    pub(crate) fn seeded(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.sample::<f64, _>(rand_distr::StandardNormal)).collect();
        t64(&v, shape)
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    // The early zero of Real::exp is libm's own answer there, and libm's above it.
    #[test]
    fn exp_underflow_shortcut_is_bit_identical() {
        for x in [-1e9f32, -1e4, -200.0, -104.5, -104.0, -103.99, -103.9, -90.0, -87.0, -1.0, 0.0, f32::NEG_INFINITY] {
            assert_eq!(Real::exp(x).to_bits(), f32::exp(x).to_bits(), "{x}");
        }
        for x in [-1e9f64, -746.5, -746.0, -745.2, -745.0, -700.0, -1.0, f64::NEG_INFINITY] {
            assert_eq!(Real::exp(x).to_bits(), f64::exp(x).to_bits(), "{x}");
        }
        assert!(Real::exp(f32::NAN).is_nan());
    }

    #[test]
    fn fused_rms_norm_matches_composed_values_and_gradients() -> Result<()> {
        let x = Var::from_tensor(&(seeded(&[2, 3, 5], 1) * 3.0)?)?;
        let w = Var::from_tensor(&seeded(&[5], 2))?;
        let c = seeded(&[2, 3, 5], 3);
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?;
        let composed = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5)?;
        assert!(max_diff(&fused, &composed) < 1e-12);
        let gf = (fused * &c)?.sum_all()?.backward()?;
        let gc = (composed * &c)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w)] {
            let (a, b) = (gf.get(v.as_tensor()).expect("fused grad"), gc.get(v.as_tensor()).expect("composed grad"));
            assert!(max_diff(a, b) < 1e-12, "d/d{name}: {}", max_diff(a, b));
        }
        // f32 runs the same kernel
        let f = rms_norm(&x.as_tensor().to_dtype(DType::F32)?, &w.as_tensor().to_dtype(DType::F32)?, 1e-5)?;
        assert!(max_diff(&f.to_dtype(DType::F64)?, &composed_f64(&x, &w)?) < 1e-5);
        Ok(())
    }

    fn composed_f64(x: &Var, w: &Var) -> Result<Tensor> {
        rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5)
    }

    #[test]
    fn fused_swiglu_matches_composed_values_and_gradients() -> Result<()> {
        let g = Var::from_tensor(&(seeded(&[2, 3, 40_000], 7) * 4.0)?)?; // > CHUNK: several chunks
        let u = Var::from_tensor(&seeded(&[2, 3, 40_000], 8))?;
        let c = seeded(&[2, 3, 40_000], 9);
        let fused = swiglu(g.as_tensor(), u.as_tensor())?;
        let composed = swiglu_composed(g.as_tensor(), u.as_tensor())?;
        assert!(max_diff(&fused, &composed) < 1e-12, "{}", max_diff(&fused, &composed));
        let gf = (fused * &c)?.sum_all()?.backward()?;
        let gc = (&composed * &c)?.sum_all()?.backward()?;
        for (name, v) in [("g", &g), ("u", &u)] {
            let (a, b) = (gf.get(v.as_tensor()).expect("fused grad"), gc.get(v.as_tensor()).expect("composed grad"));
            assert!(max_diff(a, b) < 1e-12, "d/d{name}: {}", max_diff(a, b));
        }
        // f32 runs the same kernel
        let f = swiglu(&g.as_tensor().to_dtype(DType::F32)?, &u.as_tensor().to_dtype(DType::F32)?)?;
        assert!(max_diff(&f.to_dtype(DType::F64)?, &composed) < 1e-4);
        assert!(swiglu(g.as_tensor(), &seeded(&[2, 3, 5], 1)).is_err(), "shapes must match");
        Ok(())
    }

    #[test]
    fn fused_geglu_matches_composed_and_finite_differences() -> Result<()> {
        let g = Var::from_tensor(&(seeded(&[2, 3, 40_000], 17) * 3.0)?)?; // > CHUNK: several chunks
        let u = Var::from_tensor(&seeded(&[2, 3, 40_000], 18))?;
        let c = seeded(&[2, 3, 40_000], 19);
        let fused = geglu(g.as_tensor(), u.as_tensor())?;
        let composed = geglu_composed(g.as_tensor(), u.as_tensor())?;
        assert!(max_diff(&fused, &composed) < 1e-12, "{}", max_diff(&fused, &composed));
        let gf = (&fused * &c)?.sum_all()?.backward()?;
        let gc = (&composed * &c)?.sum_all()?.backward()?;
        // candle's Gelu backward rounds its constants to six digits (0.797885, 0.0356774, ...), so
        // the two gradients agree to ~1e-6 only; the central differences below decide
        for (name, v, tol) in [("g", &g, 1e-5), ("u", &u, 1e-11)] {
            let (a, b) = (gf.get(v.as_tensor()).expect("fused grad"), gc.get(v.as_tensor()).expect("composed grad"));
            assert!(max_diff(a, b) < tol, "d/d{name}: {}", max_diff(a, b));
        }
        // the analytic gradient against central differences of the forward, element by element
        let (gv, uv) = (g.as_tensor().flatten_all()?.to_vec1::<f64>()?, u.as_tensor().flatten_all()?.to_vec1::<f64>()?);
        let dg = gf.get(g.as_tensor()).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let cv = c.flatten_all()?.to_vec1::<f64>()?;
        let f = |x: f64| geglu_rows(&[x], &[1.0])[0];
        for i in (0..gv.len()).step_by(997) {
            let h = 1e-6;
            let fd = (f(gv[i] + h) - f(gv[i] - h)) / (2.0 * h) * uv[i] * cv[i];
            assert!((fd - dg[i]).abs() <= 1e-7 * (1.0 + fd.abs()), "dg[{i}]: {} vs fd {fd}", dg[i]);
        }
        // PyTorch's gelu(approximate="tanh") at a few points (torch.nn.functional.gelu in f64, the
        // anchor venv's torch)
        let want = [(-3.0, -0.003_637_392_081_772_994_3), (-0.5, -0.154_285_990_174_856_06), (1.0, 0.841_191_990_608_276_8), (2.5, 2.484_915_733_910_001)];
        for (x, y) in want {
            assert!((f(x) - y).abs() < 1e-12, "gelu_tanh({x}) = {} vs {y}", f(x));
        }
        let f32v = geglu(&g.as_tensor().to_dtype(DType::F32)?, &u.as_tensor().to_dtype(DType::F32)?)?;
        assert!(max_diff(&f32v.to_dtype(DType::F64)?, &composed) < 1e-4);
        assert!(geglu(g.as_tensor(), &seeded(&[2, 3, 5], 1)).is_err(), "shapes must match");
        Ok(())
    }

    #[test]
    fn softcap_values_and_gradient() -> Result<()> {
        let x = Var::from_tensor(&(seeded(&[3, 7], 21) * 40.0)?)?;
        let y = softcap(x.as_tensor(), 30.0)?;
        let xs = x.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let ys = y.flatten_all()?.to_vec1::<f64>()?;
        let g = y.sum_all()?.backward()?;
        let gs = g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f64>()?;
        for ((&x, &y), &d) in xs.iter().zip(&ys).zip(&gs) {
            assert!((y - 30.0 * (x / 30.0).tanh()).abs() < 1e-12 && y.abs() < 30.0);
            let h = 1e-5;
            let fd = (30.0 * ((x + h) / 30.0).tanh() - 30.0 * ((x - h) / 30.0).tanh()) / (2.0 * h);
            assert!((d - fd).abs() < 1e-8, "{d} vs {fd}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_skips_the_gradient_of_a_constant_weight() -> Result<()> {
        let x = Var::from_tensor(&seeded(&[2, 3, 5], 1))?;
        let w = seeded(&[5], 2); // a constant
        let c = seeded(&[2, 3, 5], 3);
        let g = (rms_norm(x.as_tensor(), &w, 1e-5)? * &c)?.sum_all()?.backward()?;
        let gc = (rms_norm_composed(x.as_tensor(), &w, 1e-5)? * &c)?.sum_all()?.backward()?;
        assert!(max_diff(g.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap()) < 1e-12);
        assert!(g.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn fused_masked_softmax_matches_composed_values_and_gradients() -> Result<()> {
        let mask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &Device::Cpu)?;
        let per_row = attention_bias(Some(&mask), 5, 0, DType::F64, &Device::Cpu)?; // (2, 1, 5, 5)
        let shared = attention_bias(None, 2, 3, DType::F64, &Device::Cpu)?; // (1, 1, 2, 5)
        for (bias, t) in [(Some(&per_row), 5), (Some(&shared), 2), (None, 4)] {
            let s = Var::from_tensor(&(seeded(&[2, 3, t, 5], 4) * 2.0)?)?;
            let c = seeded(&[2, 3, t, 5], 5);
            let fused = masked_softmax(s.as_tensor(), bias)?;
            let composed = match bias {
                Some(b) => softmax_last_dim(&s.as_tensor().broadcast_add(b)?)?,
                None => softmax_last_dim(s.as_tensor())?,
            };
            assert!(max_diff(&fused, &composed) < 1e-12);
            let gf = (fused * &c)?.sum_all()?.backward()?;
            let gc = (composed * &c)?.sum_all()?.backward()?;
            let (a, b) = (gf.get(s.as_tensor()).expect("fused grad"), gc.get(s.as_tensor()).expect("composed grad"));
            assert!(max_diff(a, b) < 1e-12, "bias {:?}: {}", bias.map(|b| b.dims().to_vec()), max_diff(a, b));
        }
        assert!(masked_softmax(&seeded(&[2, 3, 4, 5], 6), Some(&per_row)).is_err(), "a bias of the wrong T is rejected");
        Ok(())
    }

    #[test]
    fn fused_rope_matches_composed_values_and_gradients() -> Result<()> {
        let inv = rope_inv_freq(8, 10000.0, None, false);
        let (cos, sin) = rope_tables(&inv, 3, 4, DType::F64, &Device::Cpu)?;
        let x = Var::from_tensor(&seeded(&[2, 3, 4, 8], 7))?;
        let c = seeded(&[2, 3, 4, 8], 8);
        let fused = rope(x.as_tensor(), &cos, &sin)?;
        let composed = rope_composed(x.as_tensor(), &cos, &sin)?;
        assert!(max_diff(&fused, &composed) < 1e-14);
        let gf = (fused * &c)?.sum_all()?.backward()?;
        let gc = (composed * &c)?.sum_all()?.backward()?;
        let (a, b) = (gf.get(x.as_tensor()).expect("fused grad"), gc.get(x.as_tensor()).expect("composed grad"));
        assert!(max_diff(a, b) < 1e-14, "{}", max_diff(a, b));
        Ok(())
    }

    // Per-row tables (N, T, hd) equal running each row alone with its own (T, hd) table.
    #[test]
    fn rope_with_per_row_tables_matches_each_row_alone() -> Result<()> {
        let inv = rope_inv_freq(8, 10000.0, None, false);
        let x = Var::from_tensor(&seeded(&[2, 3, 4, 8], 9))?;
        let c = seeded(&[2, 3, 4, 8], 10);
        let (c0, s0) = rope_tables(&inv, 5, 4, DType::F64, &Device::Cpu)?;
        let (c1, s1) = rope_tables(&inv, 2, 4, DType::F64, &Device::Cpu)?;
        let cos = Tensor::stack(&[&c0, &c1], 0)?;
        let sin = Tensor::stack(&[&s0, &s1], 0)?;
        let y = rope(x.as_tensor(), &cos, &sin)?;
        let x0 = x.as_tensor().narrow(0, 0, 1)?;
        let x1 = x.as_tensor().narrow(0, 1, 1)?;
        let want = Tensor::cat(&[rope_composed(&x0, &c0, &s0)?, rope_composed(&x1, &c1, &s1)?], 0)?;
        assert!(max_diff(&y, &want) < 1e-14);
        // the composed path with the per-row tables (the path off the CPU)
        let composed = rope_composed(x.as_tensor(), &cos, &sin)?;
        assert!(max_diff(&composed, &want) < 1e-14);
        let gc = (composed * &c)?.sum_all()?.backward()?;
        let g = (y * &c)?.sum_all()?.backward()?;
        let gw = (want * &c)?.sum_all()?.backward()?;
        let (a, b) = (g.get(x.as_tensor()).expect("grad"), gw.get(x.as_tensor()).expect("grad"));
        assert!(max_diff(a, b) < 1e-14);
        assert!(max_diff(gc.get(x.as_tensor()).expect("composed grad"), b) < 1e-14);
        Ok(())
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

    /// A window of 2: each query sees itself and the position before it (transformers
    /// `kv_idx > q_idx - 2`), with padding and with a cache.
    #[test]
    fn attention_bias_sliding_window() -> Result<()> {
        let x = MASK_VALUE;
        let m = Tensor::new(&[[1u32, 1, 1, 0]], &Device::Cpu)?;
        let b = attention_bias_windowed(Some(&m), 4, 0, Some(2), DType::F64, &Device::Cpu)?;
        #[rustfmt::skip]
        let want = [0.0, x, x, x,
                    0.0, 0.0, x, x,
                    x, 0.0, 0.0, x,
                    x, x, 0.0, x];
        assert_eq!(b.flatten_all()?.to_vec1::<f64>()?, want);
        // one new query at position 3 of a 3-position cache: keys 2 and 3
        let c = attention_bias_windowed(None, 1, 3, Some(2), DType::F64, &Device::Cpu)?;
        assert_eq!(c.flatten_all()?.to_vec1::<f64>()?, vec![x, x, 0.0, 0.0]);
        // a window at least as long as the sequence is the causal bias
        let full = attention_bias(Some(&m), 4, 0, DType::F64, &Device::Cpu)?;
        assert_eq!(attention_bias_windowed(Some(&m), 4, 0, Some(4), DType::F64, &Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?, full.flatten_all()?.to_vec1::<f64>()?);
        assert!(attention_bias_windowed(None, 1, 0, Some(0), DType::F64, &Device::Cpu).is_err());
        Ok(())
    }
}

//! The DPO-family preference losses, with TRL 1.16 `DPOTrainer`'s
//! exact definitions (`trl/trainer/dpo_trainer.py`, `_compute_loss`, `f_divergence_type =
//! "reverse_kl"`), and TRL's reward metrics.
//!
//! Legend: `N = 2B` sequences (rows `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`),
//! `B` pairs, `T` sequence length, `V` vocabulary size.
//!
//! Everything comes from four log-prob tensors of shape `(B,)`:
//! `c = log π(y_w|x) - log π_ref(y_w|x)` (chosen log-ratio), `r = log π(y_l|x) - log π_ref(y_l|x)`
//! (rejected log-ratio), `Δ = c - r`; each loss type is one small pure function of them.
//! Losses keep the dtype of their inputs (f32 in training; the golden tests run them in f64).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod combined;

pub use combined::{combined_loss, LossSpec, LossTerm, LossTypes, PairExtras};

// ------------------------------------------------------------------------------------------
// Stable log-sigmoid
// ------------------------------------------------------------------------------------------

/// `log σ(x)`, elementwise, stable for any finite `x`: `min(x, 0) - log1p(exp(-|x|))`.
///
/// Shapes: any; dtypes f32, f64. The backward is written out, `d/dx log σ(x) = σ(-x)`, so the
/// gradient is exact everywhere (including at `x = 0`, where a composed `min`/`abs` version
/// depends on how ties and `abs'(0)` are differentiated: that is step 0 of every run).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    if crate::device::cpu_kernels(&x) {
        Ok(x.apply_op1(LogSigmoid)?)
    } else {
        log_sigmoid_composed(x)
    }
}

/// [`log_sigmoid`] from differentiable candle ops (the path off the CPU):
/// `(x - |x|) / 2 - log(1 + exp(-|x|))`, which is `min(x, 0) - log1p(exp(-|x|))` written so that
/// its gradient at `x = 0` is `σ(0) = 1/2` whichever one-sided derivative `abs` takes there
/// (`min` would split its tie and give 1). Shapes and dtypes as [`log_sigmoid`].
pub fn log_sigmoid_composed(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let softplus_neg_abs = (abs.neg()?.exp()? + 1.0)?.log()?;
    Ok(((x - &abs)? * 0.5)?.sub(&softplus_neg_abs)?)
}

/// `σ(x) = exp(log σ(x))`, stable and differentiable (through [`log_sigmoid`]).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

struct LogSigmoid;

impl CustomOp1 for LogSigmoid {
    fn name(&self) -> &'static str {
        "ropo-log-sigmoid"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::cpu_backend::unary_map;
        let out = match storage {
            CpuStorage::F32(s) => CpuStorage::F32(unary_map(s, layout, |x: f32| x.min(0.0) - (-x.abs()).exp().ln_1p())),
            CpuStorage::F64(s) => CpuStorage::F64(unary_map(s, layout, |x: f64| x.min(0.0) - (-x.abs()).exp().ln_1p())),
            _ => candle_core::bail!("log_sigmoid: unsupported dtype (use f32 or f64)"),
        };
        Ok((out, layout.shape().clone()))
    }

    // Saves nothing: the backward recomputes σ(-x) = exp(log σ(-x)) from the input.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let sig_neg = arg.neg()?.apply_op1(LogSigmoid)?.exp()?;
        Ok(Some(grad_res.mul(&sig_neg)?))
    }
}

// ------------------------------------------------------------------------------------------
// Loss types
// ------------------------------------------------------------------------------------------

/// The preference loss, named as TRL's `DPOConfig.loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DPO (Rafailov et al. 2023, Eq. 7): `-log σ(βΔ)`.
    #[default]
    Sigmoid,
    /// SLiC-style hinge (Zhao et al. 2023): `relu(1 - βΔ)`.
    Hinge,
    /// IPO (Azar et al. 2023, Eq. 17), length-normalised as TRL does: `(c/n_w - r/n_l - 1/(2β))²`.
    Ipo,
    /// EXO-pref (Ji et al. 2024, Eq. 16) with `ε = label_smoothing`.
    ExoPair,
    /// NCA (Chen et al. 2024), pairwise.
    NcaPair,
    /// Robust DPO (Chowdhury et al. 2024) with `ε = label_smoothing`.
    Robust,
    /// BCO (Jung et al. 2024), pairwise, without the running reward shift.
    BcoPair,
    /// SPPO (Wu et al. 2024), hard-probability version.
    SppoHard,
    /// APO-zero (D'Oosterlinck et al. 2024, Eq. 7).
    ApoZero,
    /// APO-down (D'Oosterlinck et al. 2024, Eq. 8).
    ApoDown,
    /// DiscoPOP (Chris Lu et al. 2024, Eq. 5) with temperature `discopop_tau`.
    Discopop,
    /// DPO on length-normalised log-ratios (TRL's `sigmoid_norm`, SimPO-style with a reference).
    SigmoidNorm,
    /// AOT (Melnyk et al. 2024), paired: sorted policy vs sorted reference log-ratio gaps.
    Aot,
    /// AOT, unpaired: sorted chosen vs sorted rejected log-ratios.
    AotUnpaired,
}

impl LossType {
    /// Every loss type (TRL 1.16's, except `sft`, which is `rpo_alpha` here).
    pub const ALL: [LossType; 14] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::SigmoidNorm,
        LossType::Aot,
        LossType::AotUnpaired,
    ];

    /// The config name (`"sigmoid"`, `"exo_pair"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::SigmoidNorm => "sigmoid_norm",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
        }
    }

    /// Parse a config name; the error lists the valid names.
    pub fn from_name(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|l| l.name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|l| l.name()).collect();
            Error::Config(format!("unknown loss type {s:?}; should be one of {names:?}"))
        })
    }

    /// Whether TRL 1.16 reads `label_smoothing` in this loss (`robust`, `exo_pair`, `aot`,
    /// `aot_unpaired`).
    pub fn reads_label_smoothing(self) -> bool {
        matches!(self, LossType::Robust | LossType::ExoPair | LossType::Aot | LossType::AotUnpaired)
    }

    /// The valid `label_smoothing` values for this loss, or the reason a value is refused.
    ///
    /// TRL 1.16 reads `label_smoothing` only in `robust` (`0 <= ε < 0.5`, the `1 - 2ε`
    /// denominator), `aot` and `aot_unpaired` (cDPO-style smoothing; `0 <= ε < 0.5`, the range
    /// TRL documents for it) and `exo_pair` (`0 < ε < 1`: `log ε` and `log(1 - ε)` appear);
    /// every other loss ignores it, so a non-zero value there is refused rather than ignored.
    pub fn check_label_smoothing(self, eps: f64) -> std::result::Result<(), String> {
        let ok = match self {
            LossType::Robust | LossType::Aot | LossType::AotUnpaired => (0.0..0.5).contains(&eps),
            LossType::ExoPair => eps > 0.0 && eps < 1.0,
            _ => eps == 0.0,
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            LossType::Robust | LossType::Aot | LossType::AotUnpaired => format!("must be in [0, 0.5) for loss_type {:?}", self.name()),
            LossType::ExoPair => "must be in (0, 1) for loss_type \"exo_pair\" (the EXO paper suggests 1e-3)".to_string(),
            other => format!(
                "must be 0 for loss_type {:?}: TRL 1.16 uses label_smoothing only in \"robust\", \"exo_pair\", \"aot\" and \"aot_unpaired\"",
                other.name()
            ),
        })
    }

    /// The per-pair loss when policy = reference (`c = r = 0`), as at step 0 of training, in closed
    /// form: a check for the trainer's first step.
    ///
    /// sigmoid, robust, sigmoid_norm, aot, aot_unpaired: `ln 2`; hinge: `1`; ipo: `(1/(2β))²`; exo_pair:
    /// `½(ln ½ - ln(1-ε)) + ½(ln ½ - ln ε)`; nca_pair, bco_pair: `2 ln 2`; sppo_hard: `2 (1/(2β))²`;
    /// apo_zero, apo_down: `1`; discopop: `(ln 2 + 1)/2`.
    pub fn value_at_reference(self, p: &LossParams) -> f64 {
        let ln2 = std::f64::consts::LN_2;
        let half_over_beta = 0.5 / p.beta;
        match self {
            LossType::Sigmoid | LossType::Robust | LossType::SigmoidNorm | LossType::Aot | LossType::AotUnpaired => ln2,
            LossType::Hinge | LossType::ApoZero | LossType::ApoDown => 1.0,
            LossType::Ipo => half_over_beta * half_over_beta,
            LossType::ExoPair => {
                let e = p.label_smoothing;
                0.5 * (-ln2 - (-e).ln_1p()) + 0.5 * (-ln2 - e.ln())
            }
            LossType::NcaPair | LossType::BcoPair => 2.0 * ln2,
            LossType::SppoHard => 2.0 * half_over_beta * half_over_beta,
            LossType::Discopop => 0.5 * (ln2 + 1.0),
        }
    }
}

impl std::fmt::Display for LossType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The hyperparameters the losses read (TRL `DPOConfig` names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParams {
    /// β, the strength of the implicit KL constraint (> 0).
    pub beta: f64,
    /// ε of `robust` and `exo_pair` (see [`LossType::check_label_smoothing`]).
    pub label_smoothing: f64,
    /// τ of `discopop` (TRL default 0.05).
    pub discopop_tau: f64,
}

impl Default for LossParams {
    fn default() -> Self {
        Self { beta: 0.1, label_smoothing: 0.0, discopop_tau: 0.05 }
    }
}

/// The sequence log-probs of a batch of `B` pairs; every field is `(B,)`, all of one float dtype.
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// `log π(y_w|x)`, summed over completion tokens (differentiable).
    pub policy_chosen: Tensor,
    /// `log π(y_l|x)` (differentiable).
    pub policy_rejected: Tensor,
    /// `log π_ref(y_w|x)` (constant).
    pub reference_chosen: Tensor,
    /// `log π_ref(y_l|x)` (constant).
    pub reference_rejected: Tensor,
    /// Completion token count of each chosen sequence.
    pub chosen_tokens: Tensor,
    /// Completion token count of each rejected sequence.
    pub rejected_tokens: Tensor,
}

/// The log-ratios every loss is a function of; `(B,)` each.
struct Scores<'a> {
    /// `c = log π(y_w|x) - log π_ref(y_w|x)`.
    c: Tensor,
    /// `r = log π(y_l|x) - log π_ref(y_l|x)`.
    r: Tensor,
    /// `Δ = c - r`.
    delta: Tensor,
    n_w: &'a Tensor,
    n_l: &'a Tensor,
    /// The four log-probs (AOT sorts their differences across the batch).
    logps: &'a PairLogps,
}

/// The per-pair loss `(B,)` of `loss_type` (TRL 1.16 `_compute_loss`, reverse-KL scores).
pub fn per_pair_loss(loss_type: LossType, logps: &PairLogps, p: &LossParams) -> Result<Tensor> {
    let c = (&logps.policy_chosen - logps.reference_chosen.detach())?;
    let r = (&logps.policy_rejected - logps.reference_rejected.detach())?;
    let delta = (&c - &r)?;
    let s = Scores { c, r, delta, n_w: &logps.chosen_tokens, n_l: &logps.rejected_tokens, logps };
    match loss_type {
        LossType::Sigmoid => sigmoid_loss(&s, p),
        LossType::Hinge => hinge_loss(&s, p),
        LossType::Ipo => ipo_loss(&s, p),
        LossType::ExoPair => exo_pair_loss(&s, p),
        LossType::NcaPair => nca_pair_loss(&s, p),
        LossType::Robust => robust_loss(&s, p),
        LossType::BcoPair => bco_pair_loss(&s, p),
        LossType::SppoHard => sppo_hard_loss(&s, p),
        LossType::ApoZero => apo_zero_loss(&s, p),
        LossType::ApoDown => apo_down_loss(&s, p),
        LossType::Discopop => discopop_loss(&s, p),
        LossType::SigmoidNorm => sigmoid_norm_loss(&s, p),
        LossType::Aot => aot_loss(&s, p),
        LossType::AotUnpaired => aot_unpaired_loss(&s, p),
    }
}

/// DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7: `L = -log σ(βΔ)`.
fn sigmoid_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    Ok(log_sigmoid(&s.delta.affine(p.beta, 0.0)?)?.neg()?)
}

/// Hinge (SLiC, Zhao et al. 2023, arXiv 2305.10425, Eq. 3 with margin 1/β): `L = relu(1 - βΔ)`.
fn hinge_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    Ok(s.delta.affine(-p.beta, 1.0)?.relu()?)
}

/// IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17 with τ = β, on per-token log-ratios as
/// TRL does (confirmed with the IPO authors, per TRL's comment):
/// `L = (c/n_w - r/n_l - 1/(2β))²`, `n = max(completion tokens, 1)`.
fn ipo_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let ca = (&s.c / s.n_w.clamp(1.0, f64::INFINITY)?)?;
    let ra = (&s.r / s.n_l.clamp(1.0, f64::INFINITY)?)?;
    Ok((ca - ra)?.affine(1.0, -0.5 / p.beta)?.sqr()?)
}

/// EXO-pref, Ji et al. 2024 (arXiv 2402.00856), Eq. 16: `KL(q ‖ p_ε)` for K = 2 with
/// `q = (σ(βΔ), σ(-βΔ))` and `p_ε = (1-ε, ε)`:
/// `L = σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)`.
fn exo_pair_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let e = p.label_smoothing;
    let z = s.delta.affine(p.beta, 0.0)?;
    let log_qw = log_sigmoid(&z)?;
    let log_ql = log_sigmoid(&z.neg()?)?;
    let w = (log_qw.exp()? * (log_qw.affine(1.0, -(-e).ln_1p())?))?;
    let l = (log_ql.exp()? * (log_ql.affine(1.0, -e.ln())?))?;
    Ok((w + l)?)
}

/// NCA, Chen et al. 2024 (arXiv 2402.05369), pairwise form as in TRL:
/// `L = -log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)`.
fn nca_pair_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let bc = s.c.affine(p.beta, 0.0)?;
    let br = s.r.affine(p.beta, 0.0)?;
    let a = log_sigmoid(&bc)?.neg()?;
    let b = log_sigmoid(&bc.neg()?)?.affine(-0.5, 0.0)?;
    let d = log_sigmoid(&br.neg()?)?.affine(-0.5, 0.0)?;
    Ok(((a + b)? + d)?)
}

/// Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409), Eq. 7 (unbiased under label flips
/// with rate ε): `L = (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)`.
fn robust_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let e = p.label_smoothing;
    let z = s.delta.affine(p.beta, 0.0)?;
    let clean = log_sigmoid(&z)?.affine(-(1.0 - e), 0.0)?;
    let flipped = log_sigmoid(&z.neg()?)?.affine(e, 0.0)?;
    Ok((clean + flipped)?.affine(1.0 / (1.0 - 2.0 * e), 0.0)?)
}

/// BCO, Jung et al. 2024 (arXiv 2404.04656), pairwise without the reward shift δ, as TRL:
/// `L = -log σ(βc) - log σ(-βr)`.
fn bco_pair_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let a = log_sigmoid(&s.c.affine(p.beta, 0.0)?)?;
    let b = log_sigmoid(&s.r.affine(-p.beta, 0.0)?)?;
    Ok((a + b)?.neg()?)
}

/// SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 of Algorithm 1 with the hard probability
/// (P = 1 for the winner, 0 for the loser): `L = (c - 1/(2β))² + (r + 1/(2β))²`.
fn sppo_hard_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let h = 0.5 / p.beta;
    Ok((s.c.affine(1.0, -h)?.sqr()? + s.r.affine(1.0, h)?.sqr()?)?)
}

/// APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7 (the chosen outputs are better
/// than the model's): `L = (1 - σ(βc)) + σ(βr)`.
fn apo_zero_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let a = sigmoid(&s.c.affine(p.beta, 0.0)?)?.affine(-1.0, 1.0)?;
    let b = sigmoid(&s.r.affine(p.beta, 0.0)?)?;
    Ok((a + b)?)
}

/// APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8 (the chosen outputs are worse
/// than the model's): `L = σ(βc) + (1 - σ(βΔ))`.
fn apo_down_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let a = sigmoid(&s.c.affine(p.beta, 0.0)?)?;
    let b = sigmoid(&s.delta.affine(p.beta, 0.0)?)?.affine(-1.0, 1.0)?;
    Ok((a + b)?)
}

/// DiscoPOP, Chris Lu et al. 2024 (arXiv 2406.08414), Eq. 5 (log-ratio modulated loss):
/// `z = βΔ`, `w = σ(z/τ)`, `L = -log σ(z)·(1 - w) + exp(-z)·w`.
fn discopop_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let z = s.delta.affine(p.beta, 0.0)?;
    let w = sigmoid(&z.affine(1.0 / p.discopop_tau, 0.0)?)?;
    let logistic = log_sigmoid(&z)?.neg()?;
    let exponential = z.neg()?.exp()?;
    Ok(((logistic * w.affine(-1.0, 1.0)?)? + (exponential * w)?)?)
}

/// TRL's `sigmoid_norm` (SimPO-style length normalisation, Meng et al. 2024, arXiv 2405.14734,
/// Eq. 4, but on log-ratios against the reference): `L = -log σ(β(c/n_w - r/n_l))`.
fn sigmoid_norm_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let ca = (&s.c / s.n_w.clamp(1.0, f64::INFINITY)?)?;
    let ra = (&s.r / s.n_l.clamp(1.0, f64::INFINITY)?)?;
    Ok(log_sigmoid(&(ca - ra)?.affine(p.beta, 0.0)?)?.neg()?)
}

/// `x (B,)` sorted ascending across the batch; differentiable (a gather of `x`).
fn sort_batch(x: &Tensor) -> Result<Tensor> {
    let idx = x.detach().arg_sort_last_dim(true)?;
    Ok(x.index_select(&idx, 0)?)
}

/// cDPO-style smoothed logistic loss of `z = βδ`: `-(1-ε) log σ(z) - ε log σ(-z)`.
fn smoothed_logistic(delta: &Tensor, p: &LossParams) -> Result<Tensor> {
    let e = p.label_smoothing;
    let z = delta.affine(p.beta, 0.0)?;
    let a = log_sigmoid(&z)?.affine(-(1.0 - e), 0.0)?;
    let b = log_sigmoid(&z.neg()?)?.affine(-e, 0.0)?;
    Ok((a + b)?)
}

/// AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, alignment via optimal transport): the
/// policy gaps `log π(y_w|x) - log π(y_l|x)` and the reference gaps are each sorted across the
/// batch, `δ = sort(π gaps) - sort(ref gaps)`, `L = -(1-ε) log σ(βδ) - ε log σ(-βδ)` (TRL's `aot`).
/// Per-pair values are in sorted order, not the batch's (only the mean is meaningful).
fn aot_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    let pi = (&s.logps.policy_chosen - &s.logps.policy_rejected)?;
    let reference = (&s.logps.reference_chosen - &s.logps.reference_rejected)?.detach();
    smoothed_logistic(&(sort_batch(&pi)? - sort_batch(&reference)?)?, p)
}

/// AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): `δ = sort(c) - sort(r)` across the
/// batch, `L = -(1-ε) log σ(βδ) - ε log σ(-βδ)` (TRL's `aot_unpaired`).
fn aot_unpaired_loss(s: &Scores, p: &LossParams) -> Result<Tensor> {
    smoothed_logistic(&(sort_batch(&s.c)? - sort_batch(&s.r)?)?, p)
}

/// The SFT (NLL) term on the chosen completions, token-averaged over the batch:
/// `-Σ_b log π(y_w,b|x_b) / Σ_b n_w,b` (scalar).
///
/// This is TRL's `rpo_alpha` term (RPO, Pang et al. 2024, arXiv 2404.19733 v3; in TRL 1.16 the
/// `"sft"` loss type): `F.cross_entropy` over every chosen completion token of the batch.
pub fn sft_loss(policy_chosen: &Tensor, chosen_tokens: &Tensor) -> Result<Tensor> {
    let total = chosen_tokens.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(policy_chosen.sum_all()?.affine(-1.0 / total.max(1.0), 0.0)?)
}

// ------------------------------------------------------------------------------------------
// The batch loss and its metrics
// ------------------------------------------------------------------------------------------

/// Tolerance of `rewards/accuracies` and `rewards/ties`, in reward units (β times nats): 1e-4.
/// A pair counts as accurate when its reward gap `β c - β r` exceeds it, as a tie when the gap
/// is within it ([`reward_outcome`]).
///
/// Why 1e-4: at step 0 the identity adapter makes policy = reference up to float noise, and that
/// noise moves a reward by up to ~1e-5 (measured: 7.6e-6, 10 f32 ulps of a -127-nat sequence
/// log-prob times β = 0.1, in `ropo train`'s first step on SmolLM2-135M with 128-token pairs), so
/// a gap of noise is below ~2e-5; a trained adapter's reward gaps are ~1e-2 and up. With 1e-4
/// every step-0 pair is a tie (accuracy 0, ties 1) and every real preference counts. Used by the
/// training metrics ([`RewardMetrics`]) and by `ropo eval` (`eval::preference`).
pub const REWARD_TOLERANCE: f64 = 1e-4;

/// How the chosen reward of one pair compares with its rejected reward, at a tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardOutcome {
    /// `β c - β r > tolerance`: the pair counts toward `rewards/accuracies`.
    Chosen,
    /// `|β c - β r| <= tolerance`: the pair counts toward `rewards/ties`.
    Tie,
    /// `β c - β r < -tolerance` (or a NaN gap): neither.
    Rejected,
}

/// Compare a pair's rewards (`chosen = β c`, `rejected = β r`, f64) by their gap:
/// `chosen - rejected > tolerance` is [`RewardOutcome::Chosen`], `|chosen - rejected| <= tolerance`
/// a [`RewardOutcome::Tie`], anything else (including a NaN gap) [`RewardOutcome::Rejected`].
///
/// TRL computes `(chosen_rewards > rejected_rewards).float()`, i.e. tolerance 0: at step 0, where
/// the identity adapter makes policy = reference up to float noise, the noise decides each pair
/// and the accuracy comes out near 0.5. Thresholding the gap makes such a near-tie a tie; the
/// two rules agree on every pair whose gap exceeds the tolerance. (Rounding each reward to a
/// multiple of the tolerance instead, as this function did before, lets a gap of 1e-7 that
/// straddles a rounding boundary count as a win and a gap just under twice the tolerance count
/// as a tie.)
pub fn reward_outcome(chosen: f64, rejected: f64, tolerance: f64) -> RewardOutcome {
    let gap = chosen - rejected;
    if gap > tolerance {
        RewardOutcome::Chosen
    } else if gap.abs() <= tolerance {
        RewardOutcome::Tie
    } else {
        RewardOutcome::Rejected
    }
}

/// Whether a pair counts toward `rewards/accuracies`: `chosen - rejected > tolerance`
/// ([`reward_outcome`] is [`RewardOutcome::Chosen`]).
pub fn reward_accurate(chosen: f64, rejected: f64, tolerance: f64) -> bool {
    reward_outcome(chosen, rejected, tolerance) == RewardOutcome::Chosen
}

/// TRL's reward metrics of a set of pairs (means over the pairs, f64), with TRL's names in JSON:
/// the training records, `ropo train`'s evaluations and `ropo eval` (`eval::preference`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RewardMetrics {
    /// `rewards/chosen = mean(β c)`.
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    /// `rewards/rejected = mean(β r)`.
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    /// `rewards/accuracies = mean(β c - β r > REWARD_TOLERANCE)` ([`reward_accurate`]): TRL's
    /// `β c > β r` with the gap thresholded at [`REWARD_TOLERANCE`], so the step-0 accuracy of an
    /// identity adapter is 0, not float noise; TRL's value whenever every reward gap exceeds the
    /// tolerance.
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    /// `rewards/ties = mean(|β c - β r| <= REWARD_TOLERANCE)` ([`reward_outcome`]): the share of
    /// pairs neither side wins (1 at step 0). Not a TRL metric; named in its style.
    #[serde(rename = "rewards/ties", default)]
    pub rewards_ties: f64,
    /// `rewards/margins = mean(β (c - r))`.
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    /// `logps/chosen = mean(log π(y_w|x))`.
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    /// `logps/rejected = mean(log π(y_l|x))`.
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
}

impl RewardMetrics {
    /// The metrics of one batch (values only; nothing here is differentiated), from the summed
    /// log-probs in `logps` (each `(B,)`, any float dtype; computed in f64), wins and ties
    /// decided at [`REWARD_TOLERANCE`].
    pub fn compute(logps: &PairLogps, beta: f64) -> Result<Self> {
        Self::compute_with_tolerance(logps, beta, REWARD_TOLERANCE)
    }

    /// [`RewardMetrics::compute`] with wins and ties decided at `tolerance` ([`reward_outcome`]).
    pub fn compute_with_tolerance(logps: &PairLogps, beta: f64, tolerance: f64) -> Result<Self> {
        let v = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
        let (pc, pr, rc, rr) =
            (v(&logps.policy_chosen)?, v(&logps.policy_rejected)?, v(&logps.reference_chosen)?, v(&logps.reference_rejected)?);
        let b = pc.len().max(1) as f64;
        let mut m = RewardMetrics::default();
        for i in 0..pc.len() {
            let (wc, wr) = (beta * (pc[i] - rc[i]), beta * (pr[i] - rr[i]));
            m.rewards_chosen += wc / b;
            m.rewards_rejected += wr / b;
            match reward_outcome(wc, wr, tolerance) {
                RewardOutcome::Chosen => m.rewards_accuracies += 1.0 / b,
                RewardOutcome::Tie => m.rewards_ties += 1.0 / b,
                RewardOutcome::Rejected => {}
            }
            m.rewards_margins += (wc - wr) / b;
            m.logps_chosen += pc[i] / b;
            m.logps_rejected += pr[i] / b;
        }
        Ok(m)
    }

    /// `(TRL name, value)` pairs, in TRL's order, `rewards/ties` right after `rewards/accuracies`.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/ties", self.rewards_ties),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

/// The batch loss and what is logged about it.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The scalar to differentiate: `Σ_k w_k mean_b L_k,b` ([`combined_loss`]).
    pub loss: Tensor,
    /// `Σ_k w_k L_k,b`, `(B,)`.
    pub per_pair: Tensor,
    /// TRL's reward metrics.
    pub metrics: RewardMetrics,
    /// Each term's batch mean before its weight, by [`LossTerm::metric_name`], in the
    /// configured order.
    pub terms: Vec<(&'static str, f64)>,
}

/// The preference loss of a batch: `mean_b L_b`, plus `rpo_alpha ·` [`sft_loss`] when
/// `rpo_alpha` is set (the spec `[(loss_type, 1), ("sft", rpo_alpha)]`, [`LossSpec::single`]);
/// with TRL's reward metrics.
pub fn preference_loss(loss_type: LossType, logps: &PairLogps, p: &LossParams, rpo_alpha: Option<f64>) -> Result<LossOutput> {
    combined_loss(&LossSpec::single(loss_type, rpo_alpha), logps, &PairExtras::default(), p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logps::{completion_logps, completion_token_counts, split_pairs};
    use candle_core::{Device, Var};
    use serde_json::Value;

    fn golden() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden/dpo_losses_golden.json");
        serde_json::from_str(&std::fs::read_to_string(path).expect("reading dpo_losses_golden.json")).unwrap()
    }

    fn vecf(v: &Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    fn t64(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn golden_inputs(g: &Value) -> (Var, Var, PairLogps, LossParams) {
        let pc = Var::from_tensor(&t64(&vecf(&g["policy_chosen_logps"]))).unwrap();
        let pr = Var::from_tensor(&t64(&vecf(&g["policy_rejected_logps"]))).unwrap();
        let logps = PairLogps {
            policy_chosen: pc.as_tensor().clone(),
            policy_rejected: pr.as_tensor().clone(),
            reference_chosen: t64(&vecf(&g["reference_chosen_logps"])),
            reference_rejected: t64(&vecf(&g["reference_rejected_logps"])),
            chosen_tokens: t64(&vecf(&g["chosen_completion_tokens"])),
            rejected_tokens: t64(&vecf(&g["rejected_completion_tokens"])),
        };
        let p = LossParams {
            beta: g["beta"].as_f64().unwrap(),
            label_smoothing: g["label_smoothing"].as_f64().unwrap(),
            discopop_tau: g["discopop_tau"].as_f64().unwrap(),
        };
        (pc, pr, logps, p)
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs() / w.abs().max(1.0);
            assert!(err <= tol, "{what}[{i}]: got {g}, want {w} (rel err {err:e} > {tol:e})");
        }
    }

    // Every loss of ../shared/golden/dpo_losses_golden.json (TRL 1.16 formulas in torch float64,
    // gradients by autograd): per-pair loss, mean loss and both gradients. We run in f64 too,
    // so the only differences are the order of float operations and libm (exp/log1p differ
    // between libms by an ulp or two): 1e-12 relative (it also passes at 1e-14 here; the margin
    // is for other libms). A wrong formula is off by far more than 1e-6.
    #[test]
    fn every_golden_loss_matches_trl() {
        let g = golden();
        let rows = g["losses"].as_array().unwrap();
        assert_eq!(rows.len(), 12, "golden file has 12 loss types");
        let mut seen = Vec::new();
        for row in rows {
            let name = row["loss_type"].as_str().unwrap();
            let lt = LossType::from_name(name).unwrap_or_else(|e| panic!("{e}"));
            seen.push(lt);
            let (pc, pr, logps, p) = golden_inputs(&g);
            let out = preference_loss(lt, &logps, &p, None).unwrap();
            assert_close(&format!("{name} per_pair"), &out.per_pair.to_vec1::<f64>().unwrap(), &vecf(&row["per_pair_loss"]), 1e-12);
            assert_close(&format!("{name} mean"), &[out.loss.to_scalar::<f64>().unwrap()], &[row["mean_loss"].as_f64().unwrap()], 1e-12);
            let grads = out.loss.backward().unwrap();
            let gc = grads.get(pc.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for policy chosen logps"));
            let gr = grads.get(pr.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for policy rejected logps"));
            // Gradients are O(1e-2); compare them absolutely at 1e-12 (the relative helper
            // uses max(|w|, 1) as the scale).
            assert_close(&format!("{name} d/d chosen"), &gc.to_vec1::<f64>().unwrap(), &vecf(&row["grad_policy_chosen_logps"]), 1e-12);
            assert_close(&format!("{name} d/d rejected"), &gr.to_vec1::<f64>().unwrap(), &vecf(&row["grad_policy_rejected_logps"]), 1e-12);
        }
        seen.sort();
        let mut rest: Vec<LossType> = LossType::ALL.into_iter().filter(|l| !seen.contains(l)).collect();
        rest.sort();
        // The two AOT losses are not in the golden file; aot_matches_hand_computation checks them.
        assert_eq!(rest, vec![LossType::Aot, LossType::AotUnpaired], "every other LossType is covered by the golden file");
    }

    // The same in f32 (the training dtype): the inputs are O(100) log-probs whose differences
    // are O(1), so f32 rounding of the inputs (~1e-5 absolute) bounds the agreement: 1e-4
    // relative on losses and gradients.
    #[test]
    fn golden_losses_in_f32() {
        let g = golden();
        for row in g["losses"].as_array().unwrap() {
            let lt = LossType::from_name(row["loss_type"].as_str().unwrap()).unwrap();
            let (_, _, l64, p) = golden_inputs(&g);
            let f = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
            let (pc, pr) = (f(&l64.policy_chosen), f(&l64.policy_rejected));
            let c32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let logps = PairLogps {
                policy_chosen: pc.as_tensor().clone(),
                policy_rejected: pr.as_tensor().clone(),
                reference_chosen: c32(&l64.reference_chosen),
                reference_rejected: c32(&l64.reference_rejected),
                chosen_tokens: c32(&l64.chosen_tokens),
                rejected_tokens: c32(&l64.rejected_tokens),
            };
            let out = preference_loss(lt, &logps, &p, None).unwrap();
            let got = out.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert_close(&format!("{lt} f32 mean"), &[got], &[row["mean_loss"].as_f64().unwrap()], 1e-4);
            let grads = out.loss.backward().unwrap();
            let gc = grads.get(pc.as_tensor()).unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert_close(&format!("{lt} f32 d/d chosen"), &gc, &vecf(&row["grad_policy_chosen_logps"]), 1e-4);
        }
    }

    // rewards/* from the golden file (TRL's raw `>` for accuracies: every golden reward gap
    // exceeds REWARD_TOLERANCE, so the thresholded rule must give TRL's number exactly, and no
    // pair is a tie); logps/* are the plain means of the policy log-probs.
    #[test]
    fn reward_metrics_match_golden() {
        let g = golden();
        let (_, _, logps, p) = golden_inputs(&g);
        let gaps = (&(&logps.policy_chosen - &logps.reference_chosen).unwrap()
            - &(&logps.policy_rejected - &logps.reference_rejected).unwrap())
            .unwrap()
            .affine(p.beta, 0.0)
            .unwrap();
        for gap in gaps.to_vec1::<f64>().unwrap() {
            assert!(gap.abs() > REWARD_TOLERANCE, "golden reward gap {gap} within the tolerance");
        }
        let m = RewardMetrics::compute(&logps, p.beta).unwrap();
        let want = &g["metrics"];
        for (name, got) in m.named() {
            let w = match name {
                "logps/chosen" => vecf(&g["policy_chosen_logps"]).iter().sum::<f64>() / 4.0,
                "logps/rejected" => vecf(&g["policy_rejected_logps"]).iter().sum::<f64>() / 4.0,
                "rewards/ties" => 0.0,
                _ => want[name].as_f64().unwrap_or_else(|| panic!("golden has no {name}")),
            };
            assert!((got - w).abs() < 1e-12, "{name}: got {got}, want {w}");
        }
    }

    // rewards/accuracies thresholds the reward gap at REWARD_TOLERANCE: noise-level gaps are
    // ties (TRL's raw `>` would count about half of them), gaps beyond the tolerance give TRL's
    // answer.
    #[test]
    fn reward_accuracy_thresholds_noise_to_ties() {
        let tol = REWARD_TOLERANCE;
        // float noise of an identity adapter: TRL's raw comparison says "win", ours "tie"
        assert!(3e-7 > -2e-7 && !reward_accurate(3e-7, -2e-7, tol));
        assert_eq!(reward_outcome(3e-7, -2e-7, tol), RewardOutcome::Tie);
        assert!(0.0 > -7.6e-6 && !reward_accurate(0.0, -7.6e-6, tol));
        assert!(!reward_accurate(0.0, 0.0, tol) && !reward_accurate(-4e-6, 4e-6, tol));
        assert_eq!(reward_outcome(0.0, 0.0, tol), RewardOutcome::Tie);
        assert_eq!(reward_outcome(f64::NAN, 0.0, tol), RewardOutcome::Rejected);
        // every gap beyond the tolerance, at rewards from -10 to 10: the same answer as TRL's
        for k in -200..=200 {
            let r = k as f64 * 0.05 + 1.234567e-6;
            for gap in [1.0001 * tol, 1.5 * tol, 3.7 * tol, 1e-3, 0.25, 7.0] {
                assert!(reward_accurate(r + gap, r, tol), "{r} + {gap} vs {r}");
                assert_eq!(reward_outcome(r - gap, r, tol), RewardOutcome::Rejected, "{r} - {gap} vs {r}");
            }
            // and every gap within it is a tie, wherever the rewards sit
            for gap in [0.0, 1e-7, 0.5 * tol, 0.9999 * tol] {
                assert_eq!(reward_outcome(r + gap, r, tol), RewardOutcome::Tie, "{r} + {gap} vs {r}");
                assert_eq!(reward_outcome(r - gap, r, tol), RewardOutcome::Tie, "{r} - {gap} vs {r}");
            }
        }
        // RewardMetrics uses the same rule: logps off by f32 noise (up to 7.6e-5 nats, as measured
        // in `ropo train`'s first step; beta 0.1) give 0, a real gap in one pair of three gives 1/3
        let pc = t64(&[-50.0 + 2e-5, -7.5, -120.25 + 1e-5]);
        let pr = t64(&[-53.0, -10.5 - 7.6e-5, -123.25]);
        let base = t64(&[-50.0, -7.5, -120.25]);
        let logps = PairLogps {
            policy_chosen: pc,
            policy_rejected: pr,
            reference_chosen: base.clone(),
            reference_rejected: (&base - 3.0).unwrap(),
            chosen_tokens: t64(&[1.0; 3]),
            rejected_tokens: t64(&[1.0; 3]),
        };
        let m = RewardMetrics::compute(&logps, 0.1).unwrap();
        assert_eq!(m.rewards_accuracies, 0.0, "{m:?}");
        assert_eq!(m.rewards_ties, 1.0, "{m:?}");
        assert!(m.rewards_margins > 0.0, "the raw gaps favour chosen: {m:?}");
        let logps = PairLogps { policy_chosen: (&logps.policy_chosen + t64(&[0.0, 0.0, 0.5])).unwrap(), ..logps };
        let m = RewardMetrics::compute(&logps, 0.1).unwrap();
        assert!((m.rewards_accuracies - 1.0 / 3.0).abs() < 1e-15, "{m:?}");
        assert!((m.rewards_ties - 2.0 / 3.0).abs() < 1e-15, "{m:?}");
    }

    // Issue 15, case 7: accuracy rounded each reward to a multiple of 1e-4 and compared the
    // rounded values, so a gap of 1e-7 straddling a rounding boundary (0.5e-4 ± 0.5e-7 round to 1
    // and 0) counted as a win. The rule is now the gap against the tolerance: a tie.
    #[test]
    fn case7_accuracy_thresholds_the_gap_not_rounded_rewards() {
        let tol = REWARD_TOLERANCE;
        let (c, r) = (0.5e-4 + 0.5e-7, 0.5e-4 - 0.5e-7);
        assert!((c / tol).round() > (r / tol).round(), "the old rule calls this a win");
        assert!(!reward_accurate(c, r, tol));
        assert_eq!(reward_outcome(c, r, tol), RewardOutcome::Tie);
        // a gap just under the tolerance, not straddling: a tie under both rules; just over: a win
        assert_eq!(reward_outcome(0.0, -0.99e-4, tol), RewardOutcome::Tie);
        assert_eq!(reward_outcome(0.0, -1.01e-4, tol), RewardOutcome::Chosen);
        // through RewardMetrics (the training metrics): beta 1, the straddling gap is a tie
        let logps = PairLogps {
            policy_chosen: t64(&[c]),
            policy_rejected: t64(&[r]),
            reference_chosen: t64(&[0.0]),
            reference_rejected: t64(&[0.0]),
            chosen_tokens: t64(&[1.0]),
            rejected_tokens: t64(&[1.0]),
        };
        let m = RewardMetrics::compute(&logps, 1.0).unwrap();
        assert_eq!((m.rewards_accuracies, m.rewards_ties), (0.0, 1.0), "{m:?}");
    }

    // Step 0: policy = reference, so c = r = 0. Each loss takes the closed form of
    // value_at_reference; checked against hand-computed numbers for beta = 0.1, eps = 0.1, tau = 0.05.
    #[test]
    fn value_at_equal_policy_and_reference() {
        let ln2 = std::f64::consts::LN_2;
        let hand = |lt: LossType| -> f64 {
            match lt {
                LossType::Sigmoid | LossType::Robust | LossType::SigmoidNorm | LossType::Aot | LossType::AotUnpaired => ln2,
                LossType::Hinge | LossType::ApoZero | LossType::ApoDown => 1.0,
                LossType::Ipo => 25.0,       // (1/(2*0.1))^2
                LossType::SppoHard => 50.0,  // 2 * 25
                LossType::NcaPair | LossType::BcoPair => 2.0 * ln2,
                LossType::Discopop => 0.5 * (ln2 + 1.0),
                // 0.5*(ln .5 - ln .9) + 0.5*(ln .5 - ln .1) = ln .5 - 0.5*ln .09
                LossType::ExoPair => 0.5f64.ln() - 0.5 * 0.09f64.ln(),
            }
        };
        let same = t64(&[-50.0, -7.5, -120.25]);
        for lt in LossType::ALL {
            let p = LossParams {
                beta: 0.1,
                label_smoothing: if matches!(lt, LossType::Robust | LossType::ExoPair | LossType::Aot | LossType::AotUnpaired) { 0.1 } else { 0.0 },
                discopop_tau: 0.05,
            };
            let logps = PairLogps {
                policy_chosen: same.clone(),
                policy_rejected: (&same - 3.0).unwrap(),
                reference_chosen: same.clone(),
                reference_rejected: (&same - 3.0).unwrap(),
                chosen_tokens: t64(&[10.0, 3.0, 40.0]),
                rejected_tokens: t64(&[12.0, 5.0, 33.0]),
            };
            let out = preference_loss(lt, &logps, &p, None).unwrap();
            let got = out.loss.to_scalar::<f64>().unwrap();
            assert!((got - hand(lt)).abs() < 1e-12, "{lt}: loss {got}, hand value {}", hand(lt));
            assert!((lt.value_at_reference(&p) - hand(lt)).abs() < 1e-12, "{lt}: value_at_reference");
            assert_eq!(out.metrics.rewards_chosen, 0.0);
            assert_eq!(out.metrics.rewards_margins, 0.0);
            assert_eq!(out.metrics.rewards_accuracies, 0.0, "ties are not accurate (strict >)");
            assert_eq!(out.metrics.rewards_ties, 1.0, "every step-0 pair is a tie");
        }
        // sigmoid's gradient at step 0 is -β/2 per pair, over B pairs: d/dc = -0.1 * 0.5 / 3.
        let pc = Var::from_tensor(&same).unwrap();
        let logps = PairLogps {
            policy_chosen: pc.as_tensor().clone(),
            policy_rejected: same.clone(),
            reference_chosen: same.clone(),
            reference_rejected: same.clone(),
            chosen_tokens: t64(&[1.0; 3]),
            rejected_tokens: t64(&[1.0; 3]),
        };
        let out = preference_loss(LossType::Sigmoid, &logps, &LossParams::default(), None).unwrap();
        let g = out.loss.backward().unwrap().get(pc.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for x in g {
            assert!((x - (-0.1 * 0.5 / 3.0)).abs() < 1e-15, "step-0 gradient {x}");
        }
    }

    // AOT on the golden inputs (not in the golden file): the formula written out in f64 with
    // Rust's sort, and the gradient against central finite differences (h = 1e-6; the loss is
    // smooth away from ties, and the inputs have none).
    #[test]
    fn aot_matches_hand_computation() {
        let g = golden();
        let v = |k: &str| vecf(&g[k]);
        let (pc, pr, rc, rr) = (v("policy_chosen_logps"), v("policy_rejected_logps"), v("reference_chosen_logps"), v("reference_rejected_logps"));
        let (beta, eps) = (0.1, 0.1);
        let lsig = |x: f64| if x < 0.0 { x - x.exp().ln_1p() } else { -(-x).exp().ln_1p() };
        let smooth = |d: f64| -(1.0 - eps) * lsig(beta * d) - eps * lsig(-beta * d);
        let sorted = |mut x: Vec<f64>| {
            x.sort_by(|a, b| a.partial_cmp(b).unwrap());
            x
        };
        let mean_loss = |lt: LossType, pc: &[f64], pr: &[f64]| -> f64 {
            let (a, b): (Vec<f64>, Vec<f64>) = match lt {
                LossType::Aot => (
                    sorted(pc.iter().zip(pr).map(|(c, r)| c - r).collect()),
                    sorted(rc.iter().zip(&rr).map(|(c, r)| c - r).collect()),
                ),
                _ => (
                    sorted(pc.iter().zip(&rc).map(|(p, r)| p - r).collect()),
                    sorted(pr.iter().zip(&rr).map(|(p, r)| p - r).collect()),
                ),
            };
            a.iter().zip(&b).map(|(x, y)| smooth(x - y)).sum::<f64>() / a.len() as f64
        };
        for lt in [LossType::Aot, LossType::AotUnpaired] {
            let (vc, vr, logps, _) = golden_inputs(&g);
            let p = LossParams { beta, label_smoothing: eps, discopop_tau: 0.05 };
            let out = preference_loss(lt, &logps, &p, None).unwrap();
            let got = out.loss.to_scalar::<f64>().unwrap();
            let want = mean_loss(lt, &pc, &pr);
            assert!((got - want).abs() < 1e-14, "{lt}: {got} vs {want}");
            let grads = out.loss.backward().unwrap();
            let gc = grads.get(vc.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            let gr = grads.get(vr.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            let h = 1e-6;
            for i in 0..4 {
                let bump = |x: &[f64], d: f64| {
                    let mut y = x.to_vec();
                    y[i] += d;
                    y
                };
                let fd_c = (mean_loss(lt, &bump(&pc, h), &pr) - mean_loss(lt, &bump(&pc, -h), &pr)) / (2.0 * h);
                let fd_r = (mean_loss(lt, &pc, &bump(&pr, h)) - mean_loss(lt, &pc, &bump(&pr, -h))) / (2.0 * h);
                assert!((gc[i] - fd_c).abs() < 1e-8 && fd_c.abs() > 1e-4, "{lt} d/dc[{i}]: {} vs {fd_c}", gc[i]);
                assert!((gr[i] - fd_r).abs() < 1e-8 && fd_r.abs() > 1e-4, "{lt} d/dr[{i}]: {} vs {fd_r}", gr[i]);
            }
        }
    }

    // log σ is stable far into both tails, and its gradient σ(-x) is exact; compared with
    // the f64 closed forms (ln σ(x) = -ln(1 + e^-x)).
    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        let xs = [-1000.0, -40.0, -1.0, 0.0, 1e-8, 2.5, 40.0, 1000.0];
        let v = Var::from_tensor(&t64(&xs)).unwrap();
        let y = log_sigmoid(v.as_tensor()).unwrap();
        let got = y.to_vec1::<f64>().unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let dg = grads.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for (i, &x) in xs.iter().enumerate() {
            let want = if x < 0.0 { x - x.exp().ln_1p() } else { -(-x).exp().ln_1p() };
            assert!((got[i] - want).abs() <= 1e-15 * want.abs().max(1.0), "log_sigmoid({x}) = {}, want {want}", got[i]);
            let dwant = 1.0 / (1.0 + x.exp()); // σ(-x)
            assert!((dg[i] - dwant).abs() < 1e-15, "d log_sigmoid({x}) = {}, want {dwant}", dg[i]);
            assert!(got[i].is_finite());
        }
        // f32: no overflow at ±1000 either.
        let y32 = log_sigmoid(&Tensor::new(&[-1000f32, 1000.0], &Device::Cpu).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y32, vec![-1000.0, 0.0]);
    }

    // The composed twin (the path off the CPU) has the same values and the exact gradient
    // σ(-x), at x = 0 too (the margins of step 0).
    #[test]
    fn composed_log_sigmoid_matches_and_has_the_exact_gradient_at_zero() {
        let xs = [-1000.0, -40.0, -1.0, 0.0, 1e-8, 2.5, 40.0, 1000.0];
        let v = Var::from_tensor(&t64(&xs)).unwrap();
        let y = log_sigmoid_composed(v.as_tensor()).unwrap();
        let want = log_sigmoid(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let dg = y.sum_all().unwrap().backward().unwrap().get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for (i, (&x, got)) in xs.iter().zip(y.to_vec1::<f64>().unwrap()).enumerate() {
            assert!((got - want[i]).abs() < 1e-14, "composed log_sigmoid({x}) = {got}, want {}", want[i]);
            let dwant = 1.0 / (1.0 + x.exp());
            assert!((dg[i] - dwant).abs() < 1e-14, "d composed log_sigmoid({x}) = {}, want {dwant}", dg[i]);
        }
        assert_eq!(dg[3], 0.5);
    }

    // The whole loss path in f64, logits -> completion_logps -> sigmoid DPO loss, against central
    // finite differences of every logit: (L(x + h) - L(x - h)) / 2h with h = 1e-5 has truncation
    // error O(h^2) ~ 1e-10 and rounding error ~ 1e-16/h ~ 1e-11; 1e-8 absolute is a safe bound.
    #[test]
    fn loss_path_gradient_matches_finite_differences_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (b, t, v) = (2usize, 4usize, 5usize);
        let n = 2 * b;
        let x: Vec<f64> = (0..n * t * v).map(|_| rng.random_range(-2.0..2.0)).collect();
        let ids = Tensor::from_vec((0..n * t).map(|_| rng.random_range(0..v as u32)).collect::<Vec<_>>(), (n, t), &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f64, 1., 1., 1.], [0., 0., 1., 0.], [0., 1., 1., 0.], [0., 0., 1., 1.]], &Device::Cpu).unwrap();
        let ref_c = t64(&[-3.0, -2.5]);
        let ref_r = t64(&[-2.0, -4.0]);
        let loss_of = |logits: &Tensor| -> Tensor {
            let lp = completion_logps(logits, &ids, &mask).unwrap();
            let (pc, pr) = split_pairs(&lp).unwrap();
            let (nc, nr) = split_pairs(&completion_token_counts(&mask).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
            let logps = PairLogps {
                policy_chosen: pc,
                policy_rejected: pr,
                reference_chosen: ref_c.clone(),
                reference_rejected: ref_r.clone(),
                chosen_tokens: nc,
                rejected_tokens: nr,
            };
            preference_loss(LossType::Sigmoid, &logps, &LossParams { beta: 0.5, ..Default::default() }, Some(0.3)).unwrap().loss
        };
        let var = Var::from_vec(x.clone(), (n, t, v), &Device::Cpu).unwrap();
        let loss = loss_of(var.as_tensor());
        assert_eq!(loss.dtype(), DType::F64);
        let g = loss.backward().unwrap().get(var.as_tensor()).expect("no gradient for logits").flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-5;
        let mut nonzero = 0;
        for i in 0..x.len() {
            let at = |d: f64| {
                let mut y = x.clone();
                y[i] += d;
                loss_of(&Tensor::from_vec(y, (n, t, v), &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((g[i] - fd).abs() < 1e-8, "logit {i}: autograd {} vs finite difference {fd}", g[i]);
            nonzero += usize::from(fd.abs() > 1e-6);
        }
        assert!(nonzero > 20, "the check must exercise real gradients ({nonzero} non-zero)");
    }

    // rpo_alpha adds alpha * (-sum chosen logps / sum chosen tokens): here -(-30 - 10)/(10 + 30).
    #[test]
    fn sft_term_is_token_averaged_nll() {
        let logps = PairLogps {
            policy_chosen: t64(&[-30.0, -10.0]),
            policy_rejected: t64(&[-30.0, -10.0]),
            reference_chosen: t64(&[-30.0, -10.0]),
            reference_rejected: t64(&[-30.0, -10.0]),
            chosen_tokens: t64(&[10.0, 30.0]),
            rejected_tokens: t64(&[10.0, 30.0]),
        };
        let base = preference_loss(LossType::Sigmoid, &logps, &LossParams::default(), None).unwrap();
        let with = preference_loss(LossType::Sigmoid, &logps, &LossParams::default(), Some(0.5)).unwrap();
        let diff = with.loss.to_scalar::<f64>().unwrap() - base.loss.to_scalar::<f64>().unwrap();
        assert!((diff - 0.5 * 1.0).abs() < 1e-15, "{diff}");
    }

    #[test]
    fn loss_type_names_and_label_smoothing_ranges() {
        for lt in LossType::ALL {
            let json = serde_json::to_string(&lt).unwrap();
            assert_eq!(json, format!("\"{}\"", lt.name()));
            assert_eq!(LossType::from_name(lt.name()).unwrap(), lt);
        }
        let e = LossType::from_name("dpo").unwrap_err().to_string();
        assert!(e.contains("\"sigmoid\"") && e.contains("\"sigmoid_norm\""), "{e}");
        assert!(LossType::Robust.check_label_smoothing(0.0).is_ok());
        assert!(LossType::Robust.check_label_smoothing(0.49).is_ok());
        assert!(LossType::Robust.check_label_smoothing(0.5).is_err());
        assert!(LossType::ExoPair.check_label_smoothing(0.0).is_err());
        assert!(LossType::ExoPair.check_label_smoothing(1e-3).is_ok());
        assert!(LossType::Sigmoid.check_label_smoothing(0.0).is_ok());
        assert!(LossType::Sigmoid.check_label_smoothing(0.1).unwrap_err().contains("robust"));
    }
}

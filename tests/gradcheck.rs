//! Gradients of the decoder against central finite differences, in f64.
//!
//! Every weight tensor is a `Var`; the loss is a masked next-token log-likelihood plus a fixed
//! random projection of the logits, over a right-padded batch. For each tensor, the entry with
//! the largest analytic gradient and a few seeded random entries are compared with
//! `(L(w + e) - L(w - e)) / 2e`. A tensor with no gradient (or an all-zero one) fails the test
//! by name: candle's fused softmax / rms_norm / rope would silently cut it off.

mod common;

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var, D};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use common::gradients::central_difference;
use common::tiny::tiny_config;
use ropo::model::config::{Activation, Arch, ArchExtras, ModelConfig};
use ropo::model::llama::{random_weights, Model};

const EPS: f64 = 1e-5;
const TOL: f64 = 1e-4;

/// The weights as `Var`s (one per HF tensor name) and the batch; [`loss`] builds the model from
/// the vars on every call, so that weights the loader transforms (Gemma's `1 + w` norms) follow
/// a finite-difference perturbation too.
struct Fixture {
    cfg: ModelConfig,
    vars: BTreeMap<String, Var>,
    input_ids: Tensor,
    attention_mask: Tensor,
    /// `(N, T, V)` fixed random weights of the logit projection term.
    proj: Tensor,
}

fn fixture(cfg: &ModelConfig, seed: u64) -> Result<Fixture> {
    let dev = common::test_device();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = random_weights(cfg, 0.3, &mut rng, DType::F64, &dev)?;
    let vars: BTreeMap<String, Var> = w.iter().map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?;
    // two rows, right padding in the first: lengths 4 and 6
    let input_ids = Tensor::new(&[[5u32, 17, 3, 29, 0, 0], [11, 2, 38, 7, 7, 20]], &dev)?;
    let attention_mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &dev)?;
    let n_logits = 2 * 6 * cfg.vocab_size;
    let proj: Vec<f64> = (0..n_logits).map(|_| rng.random_range(-1.0..1.0)).collect();
    let proj = Tensor::from_vec(proj, (2, 6, cfg.vocab_size), &dev)?;
    Ok(Fixture { cfg: cfg.clone(), vars, input_ids, attention_mask, proj })
}

/// `L = sum_{n,t>=1} m[n,t] log_softmax(z[n,t-1])[ids[n,t]] + 0.1 sum_{n,t} m[n,t] P[n,t,:] . z[n,t,:]`.
fn loss(f: &Fixture) -> Result<Tensor> {
    let map = f.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let model = Model::load(VarBuilder::from_tensors(map, DType::F64, f.input_ids.device()), &f.cfg)?;
    let logits = model.forward(&f.input_ids, Some(&f.attention_mask), true)?; // (N, T, V)
    let (_, t, _) = logits.dims3()?;
    let mask = f.attention_mask.to_dtype(DType::F64)?; // (N, T)
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?, D::Minus1)?; // (N, T-1, V)
    let next = f.input_ids.narrow(1, 1, t - 1)?.unsqueeze(2)?; // (N, T-1, 1)
    let tok = logp.gather(&next.contiguous()?, D::Minus1)?.squeeze(2)?; // (N, T-1)
    let ll = (tok * mask.narrow(1, 1, t - 1)?)?.sum_all()?;
    let proj = (logits * &f.proj)?.sum(D::Minus1)?; // (N, T)
    ll + ((proj * mask)?.sum_all()? * 0.1)?
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_scalar::<f64>()
}

/// Compares `grads[name]` with central differences at `entries` (flat indices).
fn check_entries(f: &Fixture, grads: &GradStore, name: &str, entries: &[usize]) -> Result<Vec<String>> {
    let var = &f.vars[name];
    let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
    let gv = g.flatten_all()?.to_vec1::<f64>()?;
    let mut failures = vec![];
    for &i in entries {
        let fd = central_difference(var, i, EPS, &|| scalar(&loss(f).unwrap()).unwrap());
        let rel = (gv[i] - fd).abs() / gv[i].abs().max(fd.abs()).max(1e-3);
        eprintln!("{name}[{i}]: analytic {:+.6e} fd {fd:+.6e} rel {rel:.1e}", gv[i]);
        if rel >= TOL {
            failures.push(format!("{name}[{i}]: analytic {} vs finite difference {fd} (rel {rel:.2e})", gv[i]));
        }
    }
    Ok(failures)
}

fn gradcheck_all(cfg: &ModelConfig, seed: u64) -> Result<()> {
    let f = fixture(cfg, seed)?;
    let grads = loss(&f)?.backward()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    let mut failures = vec![];
    let mut checked = 0;
    let n_weights = ropo::model::llama::weight_shapes(cfg).len();
    assert!(f.vars.len() == n_weights && n_weights >= 2 * 6 + 2, "expected every weight to be a Var, got {} of {n_weights}", f.vars.len());
    for (name, var) in &f.vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (the graph was cut)"));
        let gv = g.flatten_all()?.to_vec1::<f64>()?;
        let (argmax, gmax) = gv.iter().enumerate().fold((0, 0.0f64), |acc, (i, v)| if v.abs() > acc.1 { (i, v.abs()) } else { acc });
        assert!(gmax > 1e-8, "{name}: gradient is identically zero");
        let mut entries = vec![argmax];
        entries.extend((0..3).map(|_| rng.random_range(0..gv.len())));
        checked += entries.len();
        failures.extend(check_entries(&f, &grads, name, &entries)?);
    }
    assert!(failures.is_empty(), "{} of {checked} entries fail:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

#[test]
fn every_weight_matches_finite_differences_llama_untied() -> Result<()> {
    gradcheck_all(&tiny_config(Arch::Llama, 40, 16, false), 1)
}

#[test]
fn every_weight_matches_finite_differences_qwen2_tied_biases() -> Result<()> {
    gradcheck_all(&tiny_config(Arch::Qwen2, 40, 16, true), 2)
}

/// Qwen3: a per-head RMSNorm on q and k before RoPE, head_dim 6 != hidden / heads = 4.
fn qwen3_config() -> ModelConfig {
    let mut cfg = tiny_config(Arch::Qwen3, 40, 16, false);
    cfg.head_dim = 6;
    cfg
}

#[test]
fn every_weight_matches_finite_differences_qwen3_qk_norm() -> Result<()> {
    let f = fixture(&qwen3_config(), 4)?;
    assert_eq!(f.vars.len(), 1 + 2 * 11 + 2, "embedding, 11 tensors per layer (q/k norms included), final norm, head");
    drop(f);
    gradcheck_all(&qwen3_config(), 4)
}

/// Phi-3: the fused qkv_proj and gate_up_proj (their gradients assembled from the narrowed
/// q/k/v and gate/up slices).
#[test]
fn every_weight_matches_finite_differences_phi3_fused() -> Result<()> {
    let cfg = tiny_config(Arch::Phi3, 40, 16, false);
    let f = fixture(&cfg, 6)?;
    assert_eq!(f.vars.len(), 1 + 2 * 6 + 2, "embedding, 6 tensors per layer, final norm, head");
    drop(f);
    gradcheck_all(&cfg, 6)
}

/// Gemma 2: GeGLU (gelu-tanh gate), 1 + w norms with the two extra feed-forward norms
/// (sandwich), query_pre_attn_scalar, attention and final logit soft-capping, and a sliding
/// window of 3 on layer 0 (the fixture's rows are 4 and 6 long, so it masks keys).
fn gemma2_config() -> ModelConfig {
    let mut cfg = tiny_config(Arch::Gemma2, 40, 16, true);
    cfg.head_dim = 6;
    cfg.extras = ArchExtras {
        hidden_act: Activation::GeluTanh,
        query_pre_attn_scalar: Some(10.0),
        // small caps so that tanh is far from linear at these weights
        attn_logit_softcapping: Some(1.5),
        final_logit_softcapping: Some(4.0),
        sliding_window: Some(3),
        sliding_layers: vec![true, false],
        ..Default::default()
    };
    cfg
}

/// Gemma 3: the q/k norms (1 + w) of Qwen3 plus Gemma 2's sandwich norms, no soft-capping, a
/// local RoPE base on the sliding layer and linear RoPE scaling on the global one.
fn gemma3_config() -> ModelConfig {
    let mut cfg = tiny_config(Arch::Gemma3, 40, 16, true);
    cfg.head_dim = 6;
    cfg.extras = ArchExtras {
        hidden_act: Activation::GeluTanh,
        query_pre_attn_scalar: Some(8.0),
        sliding_window: Some(3),
        sliding_layers: vec![true, false],
        rope_local_theta: Some(100.0),
        rope_linear_factor: Some(2.0),
        ..Default::default()
    };
    cfg
}

#[test]
fn every_weight_matches_finite_differences_gemma2() -> Result<()> {
    let f = fixture(&gemma2_config(), 7)?;
    assert_eq!(f.vars.len(), 1 + 2 * 11 + 1, "embedding (tied head), 11 tensors per layer (4 norms), final norm");
    drop(f);
    gradcheck_all(&gemma2_config(), 7)
}

#[test]
fn every_weight_matches_finite_differences_gemma3() -> Result<()> {
    let f = fixture(&gemma3_config(), 8)?;
    assert_eq!(f.vars.len(), 1 + 2 * 13 + 1, "embedding (tied head), 13 tensors per layer (6 norms), final norm");
    drop(f);
    gradcheck_all(&gemma3_config(), 8)
}

/// Qwen3's q/k norm path, every entry: the norm weights `(hd,)` of both layers (reached only
/// through RoPE and the attention softmax) and layer 0's q_proj and k_proj, whose gradient now
/// also flows through the per-head norm's input backward.
#[test]
fn qwen3_qk_norm_path_every_entry() -> Result<()> {
    let f = fixture(&qwen3_config(), 5)?;
    let grads = loss(&f)?.backward()?;
    let mut failures = vec![];
    for name in [
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight",
        "model.layers.1.self_attn.q_norm.weight",
        "model.layers.1.self_attn.k_norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] {
        let n = f.vars[name].as_tensor().elem_count();
        failures.extend(check_entries(&f, &grads, name, &(0..n).collect::<Vec<_>>())?);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// q_proj and k_proj reach the loss only through RoPE and the attention softmax, the norm
/// weights only through rms_norm: check every entry of layer 0's, not a sample.
#[test]
fn attention_path_gradient_through_softmax_rope_and_rms_norm() -> Result<()> {
    let cfg = tiny_config(Arch::Llama, 40, 16, true);
    let f = fixture(&cfg, 3)?;
    let grads = loss(&f)?.backward()?;
    let mut failures = vec![];
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ] {
        let n = f.vars[name].as_tensor().elem_count();
        let g = grads.get(f.vars[name].as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let nonzero = g.flatten_all()?.to_vec1::<f64>()?.iter().filter(|v| v.abs() > 1e-10).count();
        assert!(nonzero > n / 2, "{name}: only {nonzero} of {n} entries have a gradient");
        failures.extend(check_entries(&f, &grads, name, &(0..n).collect::<Vec<_>>())?);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

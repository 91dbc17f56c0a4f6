//! The training fast paths equal the plain path, values and gradients.
//!
//! Plain path: `completion_logps(model.forward(input_ids, attention_mask), input_ids,
//! completion_mask)` over the concatenated `[chosen; rejected]` rows.
//! - completion-position LM head: `logps::completion_logps_from_hidden` (f64 tiny model with
//!   RoPO adapters on q,k,v,o and the LM head: 1e-10 on values and every gradient; f32 on the
//!   real SmolLM2-135M: 1e-3 nats on values, as the issue asks);
//! - prefix sharing: `logps::completion_logps_shared_prompt` (f64 tiny model, prompts of
//!   different lengths, right padding; 1e-10), plus central finite differences of the shared path.
//!
//! Tolerances: the fast paths change only the order of floating-point sums (attention over a
//! differently laid out key set, the segment sum, the fused log-sum-exp in f64). In f64 on values
//! of size ~10-100 that is ~1e-13; 1e-10 leaves room and still catches any wrong index or mask.
//! In f32 over 30 layers, summed over ~20 tokens of log-probs ~ -50, rounding is ~1e-4.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use common::gradients::central_difference;
use common::tiny::{max_abs, tiny_config};
use ropo::adapter::ropo::{self as ropo_adapter, RopoConfig};
use ropo::adapter::targets::TargetModules;
use ropo::logps::fused::{completion_logps_from_hidden_with, logps_at_picks_chunked, picks_concatenated};
use ropo::logps::shared_prompt::completion_logps_shared_prompt_with;
use ropo::logps::{completion_logps, completion_logps_from_hidden, completion_logps_shared_prompt, seq_logps_from_logits, LogpOptions};
use ropo::model::config::{Arch, ModelConfig};
use ropo::model::llama::{random_weights, Model};
use ropo::model::prefix::SharedPromptBatch;

/// A tiny f64 model with RoPO adapters (r=2, S=2, magnitude) on q,k,v,o (+ lm_head), set to
/// random non-identity values; returns the model and the adapters' Vars.
fn adapted_model(cfg: &ModelConfig, seed: u64, lm_head: bool) -> (Model, Vec<(String, Var)>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = random_weights(cfg, 0.3, &mut rng, DType::F64, &Device::Cpu).unwrap();
    let mut model = Model::load(VarBuilder::from_tensors(w.into_iter().collect(), DType::F64, &Device::Cpu), cfg).unwrap();
    let mut names: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec();
    if lm_head {
        names.push("lm_head".into());
    }
    let acfg = RopoConfig { target_modules: TargetModules::Names(names), householder_reflections: 2, givens_stages: 2, magnitude: true, init_seed: 3 };
    let set = ropo_adapter::inject(&mut model, &acfg, "tiny").unwrap();
    let vars = set.vars();
    for (name, v) in &vars {
        let n = v.elem_count();
        let vals: Vec<f64> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
        let t = Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap();
        let t = if name.ends_with("ropo_magnitude") { (v.as_tensor() * (t * 0.2).unwrap().affine(1.0, 1.0).unwrap()).unwrap() } else { t };
        v.set(&t).unwrap();
    }
    (model, vars)
}

/// Two pairs, prompts of lengths 3 and 5, completions of different lengths, right padding to
/// T = 10; completion mask 1 on completion tokens (0.5 on one, to check weights carry over).
fn batch() -> (Tensor, Tensor, Tensor) {
    let p0 = [4u32, 9, 2];
    let p1 = [7u32, 1, 30, 12, 5];
    let rows: [(&[u32], &[u32]); 4] = [(&p0, &[11, 3, 8, 2]), (&p1, &[6, 6, 2]), (&p0, &[20, 2]), (&p1, &[33, 14, 0, 2, 19])];
    let t = 10;
    let (mut ids, mut am, mut cm) = (vec![], vec![], vec![]);
    for (r, (p, c)) in rows.iter().enumerate() {
        for i in 0..t {
            let (id, a, m) = if i < p.len() {
                (p[i], 1, 0.0)
            } else if i < p.len() + c.len() {
                (c[i - p.len()], 1, if r == 1 && i == p.len() + 1 { 0.5 } else { 1.0 })
            } else {
                (0, 0, 0.0)
            };
            ids.push(id);
            am.push(a);
            cm.push(m);
        }
    }
    let dev = Device::Cpu;
    (Tensor::from_vec(ids, (4, t), &dev).unwrap(), Tensor::from_vec(am, (4, t), &dev).unwrap(), Tensor::from_vec(cm, (4, t), &dev).unwrap().to_dtype(DType::F64).unwrap())
}

fn plain(model: &Model, ids: &Tensor, am: &Tensor, cm: &Tensor) -> Tensor {
    completion_logps(&model.forward(ids, Some(am), true).unwrap(), ids, cm).unwrap()
}

/// Values and the gradient of `sum_n c_n logps_n` wrt every adapter Var agree to `tol`; every
/// Var gets a non-zero gradient.
fn same_values_and_grads(a: &Tensor, b: &Tensor, vars: &[(String, Var)], tol: f64) {
    assert!(max_abs(a, b) < tol, "values {a} vs {b}");
    let c = Tensor::new(&[0.7f64, -1.3, 0.4, 2.0], &Device::Cpu).unwrap().to_dtype(a.dtype()).unwrap();
    let ga = (a * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (b * &c).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in vars {
        let x = ga.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (fast path)"));
        let y = gb.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (plain path)"));
        let scale = y.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!(scale > 1e-8, "{name}: zero gradient");
        assert!(max_abs(x, y) < tol * scale.max(1.0), "{name}: {} (scale {scale})", max_abs(x, y));
    }
}

#[test]
fn completion_lm_head_equals_full_logits_f64() {
    for (arch, tied, head) in [(Arch::Llama, true, false), (Arch::Qwen2, false, true)] {
        let (model, vars) = adapted_model(&tiny_config(arch, 37, 16, tied), 1, head);
        let (ids, am, cm) = batch();
        let want = plain(&model, &ids, &am, &cm);
        let hidden = model.forward_hidden(&ids, Some(&am), true).unwrap();
        let got = completion_logps_from_hidden(&model, &hidden, &ids, &cm, true).unwrap();
        same_values_and_grads(&got, &want, &vars, 1e-10);
        // gradient wrt the hidden states themselves
        let h = Var::from_tensor(&hidden.detach()).unwrap();
        let a = completion_logps_from_hidden(&model, h.as_tensor(), &ids, &cm, true).unwrap();
        let b = completion_logps(&model.lm_head(h.as_tensor(), true).unwrap(), &ids, &cm).unwrap();
        let ga = a.sum_all().unwrap().backward().unwrap();
        let gb = b.sum_all().unwrap().backward().unwrap();
        assert!(max_abs(ga.get(h.as_tensor()).unwrap(), gb.get(h.as_tensor()).unwrap()) < 1e-10);
        // the reference model (adapters bypassed) too
        let r1 = completion_logps(&model.forward(&ids, Some(&am), false).unwrap(), &ids, &cm).unwrap();
        let r2 = completion_logps_from_hidden(&model, &model.forward_hidden(&ids, Some(&am), false).unwrap(), &ids, &cm, false).unwrap();
        assert!(max_abs(&r1, &r2) < 1e-10);
    }
}

#[test]
fn shared_prompt_equals_concatenated_f64() {
    for (arch, tied, head) in [(Arch::Llama, true, false), (Arch::Qwen2, false, true)] {
        let (model, vars) = adapted_model(&tiny_config(arch, 37, 16, tied), 2, head);
        let (ids, am, cm) = batch();
        let want = plain(&model, &ids, &am, &cm);
        let sb = SharedPromptBatch::from_concatenated(&ids, &am, &cm).unwrap();
        assert_eq!(sb.prompt_lens, vec![3, 5]);
        assert_eq!(sb.prompt_ids.dims(), &[2, 5]);
        assert_eq!(sb.completion_ids.dims(), &[4, 5]);
        let got = completion_logps_shared_prompt(&model, &sb, true).unwrap();
        same_values_and_grads(&got, &want, &vars, 1e-10);
        let r1 = completion_logps(&model.forward(&ids, Some(&am), false).unwrap(), &ids, &cm).unwrap();
        let r2 = completion_logps_shared_prompt(&model, &sb, false).unwrap();
        assert!(max_abs(&r1, &r2) < 1e-10);
    }
}

// TRL's extras (LD-DPO sums with the unweighted sums beside them, WPO weights) on both fast
// paths equal the logits route the TRL golden test checks (tests/loss_combos.rs), f64, 1e-10;
// LD-DPO and unweighted sums with their adapter gradients.
#[test]
fn fast_path_extras_equal_the_logits_route_f64() {
    let opts = LogpOptions { ld_alpha: Some(0.3), use_weighting: true };
    let (model, vars) = adapted_model(&tiny_config(Arch::Qwen2, 37, 16, false), 4, true);
    let (ids, am, cm) = batch();
    let want = seq_logps_from_logits(&model.forward(&ids, Some(&am), true).unwrap(), &ids, &cm, &opts).unwrap();
    let hidden = model.forward_hidden(&ids, Some(&am), true).unwrap();
    let fused = completion_logps_from_hidden_with(&model, &hidden, &ids, &cm, true, &opts).unwrap();
    let sb = SharedPromptBatch::from_concatenated(&ids, &am, &cm).unwrap();
    let shared = completion_logps_shared_prompt_with(&model, &sb, true, &opts).unwrap();
    let plain_sums = plain(&model, &ids, &am, &cm);
    assert!(max_abs(want.unweighted.as_ref().unwrap(), &plain_sums) < 1e-10, "unweighted sums are the plain sums");
    assert!(max_abs(&want.logps, &plain_sums) > 1e-3, "LD-DPO changes the sums of pairs of unequal lengths");
    for got in [&fused, &shared] {
        same_values_and_grads(&got.logps, &want.logps, &vars, 1e-10);
        same_values_and_grads(got.unweighted.as_ref().unwrap(), want.unweighted.as_ref().unwrap(), &vars, 1e-10);
        assert!(max_abs(got.wpo_weights.as_ref().unwrap(), want.wpo_weights.as_ref().unwrap()) < 1e-10);
    }
}

// The LM head run in chunks of rows (logps_at_picks_chunked: 1, 3 and 5 rows; the batch has 14
// picks, so a last short chunk too) equals it in one piece, values and every adapter gradient
// (the LM head's own adapter included), with and without LD-DPO; 0 rows is an error.
#[test]
fn chunked_lm_head_equals_one_piece_f64() {
    let (model, vars) = adapted_model(&tiny_config(Arch::Qwen2, 37, 16, false), 5, true);
    let (ids, am, cm) = batch();
    let hidden = model.forward_hidden(&ids, Some(&am), true).unwrap().flatten_to(1).unwrap(); // (N*T, D)
    let picks = picks_concatenated(&ids, &cm).unwrap();
    assert_eq!(picks.len(), 14);
    for opts in [LogpOptions::default(), LogpOptions { ld_alpha: Some(0.3), use_weighting: false }] {
        let whole = logps_at_picks_chunked(&model, &hidden, &picks, 4, true, &opts, usize::MAX).unwrap();
        for rows in [1, 3, 5] {
            let got = logps_at_picks_chunked(&model, &hidden, &picks, 4, true, &opts, rows).unwrap();
            same_values_and_grads(&got.logps, &whole.logps, &vars, 1e-12);
        }
    }
    assert!(logps_at_picks_chunked(&model, &hidden, &picks, 4, true, &LogpOptions::default(), 0).is_err());
}

// The shared path's adapter gradients against central finite differences (f64).
#[test]
fn shared_prompt_gradients_match_finite_differences() {
    let (model, vars) = adapted_model(&tiny_config(Arch::Llama, 37, 16, true), 3, false);
    let (ids, am, cm) = batch();
    let sb = SharedPromptBatch::from_concatenated(&ids, &am, &cm).unwrap();
    let c = Tensor::new(&[0.7f64, -1.3, 0.4, 2.0], &Device::Cpu).unwrap();
    let loss = || (completion_logps_shared_prompt(&model, &sb, true).unwrap() * &c).unwrap().sum_all().unwrap();
    let g = loss().backward().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (name, v) in &vars {
        let gv = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient")).flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for _ in 0..2 {
            let i = rng.random_range(0..gv.len());
            let fd = central_difference(v, i, 1e-5, &|| loss().to_scalar::<f64>().unwrap());
            let rel = (fd - gv[i]).abs() / fd.abs().max(gv[i].abs()).max(1e-3);
            assert!(rel < 1e-5, "{name}[{i}]: analytic {} fd {fd}", gv[i]);
        }
    }
}

#[test]
fn shared_prompt_rejects_pairs_with_different_prompts() {
    let (ids, am, cm) = batch();
    let mut v = ids.to_vec2::<u32>().unwrap();
    v[2][1] = 10; // rejected row of pair 0 gets another prompt token
    let ids2 = Tensor::new(v, &Device::Cpu).unwrap();
    let err = SharedPromptBatch::from_concatenated(&ids2, &am, &cm).unwrap_err();
    assert!(err.to_string().contains("pair 0"), "{err}");
}

// Real SmolLM2-135M (f32): both fast paths agree with the plain path to 1e-3 nats, with the
// default RoPO adapter (identity at init, then perturbed) on q,k,v,o.
#[test]
fn smollm2_fast_paths_match_plain_f32() {
    let gguf = common::smollm2_gguf();
    let mut lm = ropo::model::load(gguf.to_str().unwrap(), &ropo::model::LoadOptions::default()).unwrap();
    let set = ropo_adapter::inject(&mut lm.model, &RopoConfig::default(), "smollm2").unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (name, v) in set.vars() {
        if name.ends_with("ropo_theta") {
            let vals: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.05..0.05)).collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let model = &lm.model;
    let prompt: Vec<u32> = (0..23).map(|_| rng.random_range(0..49152)).collect();
    let comp: Vec<Vec<u32>> = (0..2).map(|k| (0..12 + 5 * k).map(|_| rng.random_range(0..49152)).collect()).collect();
    let t = 23 + 17;
    let (mut ids, mut am, mut cm) = (vec![], vec![], vec![]);
    for c in &comp {
        for i in 0..t {
            let real = i < 23 + c.len();
            ids.push(if i < 23 { prompt[i] } else if real { c[i - 23] } else { 0 });
            am.push(real as u32);
            cm.push(if i >= 23 && real { 1f32 } else { 0.0 });
        }
    }
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(ids, (2, t), &dev).unwrap();
    let am = Tensor::from_vec(am, (2, t), &dev).unwrap();
    let cm = Tensor::from_vec(cm, (2, t), &dev).unwrap();
    let want = completion_logps(&model.forward(&ids, Some(&am), true).unwrap(), &ids, &cm).unwrap();
    let hidden = model.forward_hidden(&ids, Some(&am), true).unwrap();
    let fast = completion_logps_from_hidden(model, &hidden, &ids, &cm, true).unwrap();
    assert!(max_abs(&fast, &want) < 1e-3, "{fast} vs {want}");
    let sb = SharedPromptBatch::from_concatenated(&ids, &am, &cm).unwrap();
    let shared = completion_logps_shared_prompt(model, &sb, true).unwrap();
    assert!(max_abs(&shared, &want) < 1e-3, "{shared} vs {want}");
    // gradients of u, theta of one layer agree to 1e-3 relative to their scale
    let g1 = want.sum_all().unwrap().backward().unwrap();
    let g2 = shared.sum_all().unwrap().backward().unwrap();
    for (name, v) in set.vars().iter().take(6) {
        let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(max_abs(a, b) < 1e-3 * scale.max(1e-3), "{name}: {} (scale {scale})", max_abs(a, b));
    }
}

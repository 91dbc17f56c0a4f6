//! RoPO adapter: golden conventions, orthogonality, rotation invariance, gradients (f64 finite
//! differences). Spec: `../shared/docs/ropo-method.md`, "Properties every implementation must show".

mod common;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ropo::adapter::ropo::givens;
use ropo::adapter::RopoAdapter;
use common::tiny::{max_abs, max_rel, randn, small_model, tiny_config};
use ropo::eval::energy::{hyperspherical_energy, row_cosines};
use ropo::model::linear::{Adapter, Linear};
use serde_json::Value;

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn mat(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = v.as_array().unwrap().iter().map(vec1).collect();
    let (n, d) = (rows.len(), rows.first().map_or(0, |r| r.len()));
    Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
}

/// A linear `(n, d)` with bias and an adapter with RANDOM (non-identity) parameters:
/// u ~ N(0,1) (not paired), theta ~ U(-pi, pi), m = rho * U(0.5, 1.5).
fn random_adapted(n: usize, d: usize, r: usize, s: usize, magnitude: bool, seed: u64, dtype: DType) -> (Linear, RopoAdapter) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let w = randn(&[n, d], 1.0, &mut rng, dtype);
    let b = randn(&[n], 1.0, &mut rng, dtype);
    let base = Linear::new("model.layers.0.self_attn.q_proj", w, Some(b));
    let u = (r > 0).then(|| randn(&[r, d], 1.0, &mut rng, dtype));
    let a = givens::num_angles(d, s);
    let theta = (a > 0).then(|| {
        let v: Vec<f64> = (0..a).map(|_| rng.random_range(-std::f64::consts::PI..std::f64::consts::PI)).collect();
        Tensor::from_vec(v, a, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    });
    let m = magnitude.then(|| {
        let f: Vec<f64> = (0..n).map(|_| rng.random_range(0.5..1.5)).collect();
        let f = Tensor::from_vec(f, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        (ropo::adapter::ropo::layer::row_norms(&base.weight).unwrap() * f).unwrap()
    });
    let ad = RopoAdapter::from_tensors(&base, r, s, u, theta, m).unwrap();
    (base, ad)
}

// ../shared/golden/ropo_adapter_golden.json: numpy float64 written from the spec. Theta is stored
// there per stage; our layout is the stages concatenated in stage order.
#[test]
fn golden_cases_match_to_1e10() {
    let g = common::golden("ropo_adapter_golden.json");
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for (ci, c) in cases.iter().enumerate() {
        let (d, n) = (c["d_in"].as_u64().unwrap() as usize, c["d_out"].as_u64().unwrap() as usize);
        let r = c["householder_reflections"].as_u64().unwrap() as usize;
        let s = c["givens_stages"].as_u64().unwrap() as usize;
        let w = mat(&c["W"]);
        let b = Tensor::new(vec1(&c["b"]), &Device::Cpu).unwrap();
        let base = Linear::new(format!("case{ci}"), w, Some(b));
        let u = (r > 0).then(|| mat(&c["u"]));
        let stages: Vec<Vec<f64>> = c["theta"].as_array().unwrap().iter().map(vec1).collect();
        assert_eq!(stages.len(), s);
        let lens: Vec<usize> = stages.iter().map(|v| v.len()).collect();
        assert_eq!(lens, givens::stage_ranges(d, s).iter().map(|x| x.1).collect::<Vec<_>>(), "case {ci}: stage sizes");
        let theta = (s > 0).then(|| Tensor::new(stages.concat(), &Device::Cpu).unwrap());
        let m = Tensor::new(vec1(&c["magnitude"]), &Device::Cpu).unwrap();
        let ad = RopoAdapter::from_tensors(&base, r, s, u, theta, Some(m)).unwrap();
        assert_eq!((ad.d_in, ad.d_out), (d, n));
        let rho = Tensor::new(vec1(&c["rho"]), &Device::Cpu).unwrap();
        assert!(max_abs(&ad.rho, &rho) < 1e-10, "case {ci}: rho");
        let x = mat(&c["x"]);
        let tol = 1e-10;
        let e = max_abs(&ad.rotate_t(&x).unwrap(), &mat(&c["R_T_x"]));
        assert!(e < tol, "case {ci}: R^T x off by {e}");
        let e = max_abs(&ad.rotate_t_reference(&x).unwrap(), &mat(&c["R_T_x"]));
        assert!(e < tol, "case {ci}: R^T x (rank-1 path) off by {e}");
        let e = max_abs(&ad.forward(&base, &x).unwrap(), &mat(&c["y"]));
        assert!(e < tol, "case {ci}: y off by {e}");
        let e = max_abs(&ad.dense_r().unwrap(), &mat(&c["R"]));
        assert!(e < tol, "case {ci}: R off by {e}");
        let (wm, bm) = ad.merged(&base).unwrap();
        let e = max_abs(&wm, &mat(&c["W_merged"]));
        assert!(e < tol, "case {ci}: W_merged off by {e}");
        assert!(max_abs(&bm.unwrap(), base.bias.as_ref().unwrap()) == 0.0);
    }
}

// Property 1: R^T R = I in f32 for random (non-init) parameters.
#[test]
fn orthogonal_in_f32_for_random_parameters() {
    for (i, d) in [64usize, 576, 1536].into_iter().enumerate() {
        let (_, ad) = random_adapted(4, d, 4, 2, true, 100 + i as u64, DType::F32);
        let r = ad.dense_r().unwrap();
        assert_eq!(r.dtype(), DType::F32);
        let eye = Tensor::eye(d, DType::F32, &Device::Cpu).unwrap();
        let e = max_abs(&r.t().unwrap().matmul(&r).unwrap(), &eye);
        assert!(e < 1e-5, "d={d}: max |R^T R - I| = {e}");
        // and R is not the identity
        assert!(max_abs(&r, &eye) > 0.1, "d={d}: R is (nearly) the identity");
    }
}

// Property 3: cosines between normalized rows, and hence hyperspherical energy, are unchanged by R
// (the magnitude rescales rows, which does not change cosines either).
#[test]
fn rotation_preserves_row_cosines_and_energy() {
    let (base, ad) = random_adapted(48, 64, 4, 2, true, 7, DType::F32);
    let (wm, _) = ad.merged(&base).unwrap();
    assert!(max_abs(&wm, &base.weight) > 0.1, "merged weight equals the base");
    let c0 = row_cosines(&base.weight).unwrap();
    let c1 = row_cosines(&wm).unwrap();
    let e = max_abs(&c0, &c1);
    assert!(e < 1e-5, "cosines differ by {e}");
    let (h0, h1) = (hyperspherical_energy(&base.weight).unwrap(), hyperspherical_energy(&wm).unwrap());
    assert!(((h0 - h1) / h0).abs() < 1e-5, "HE {h0} -> {h1}");
    // the energy is not trivially constant: a non-rotation (column scaling) changes it
    let diag: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 / 16.0).collect();
    let skew = base.weight.broadcast_mul(&Tensor::new(diag, &Device::Cpu).unwrap()).unwrap();
    assert!(((hyperspherical_energy(&skew).unwrap() - h0) / h0).abs() > 1e-3);
}

/// [`common::gradients::check_gradients`] on the adapter's three trainable tensors (u, theta,
/// magnitude): every entry against central finite differences, relative error below `tol`.
fn check_gradients(ad: &RopoAdapter, loss: &dyn Fn() -> Tensor, tol: f64) {
    let named = ad.trainable();
    assert_eq!(named.len(), 3, "expected u, theta, magnitude");
    common::gradients::check_gradients(&named, loss, tol);
}

// Property 4: gradients of u, theta and m through an adapted linear match finite differences.
#[test]
fn gradients_match_finite_differences_f64() {
    let (base, ad) = random_adapted(5, 9, 4, 3, true, 11, DType::F64);
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let x = randn(&[2, 3, 9], 1.0, &mut rng, DType::F64);
    let p = randn(&[2, 3, 5], 1.0, &mut rng, DType::F64);
    // a non-linear scalar of the output, so every direction matters
    let loss = || ad.forward(&base, &x).unwrap().tanh().unwrap().mul(&p).unwrap().sum_all().unwrap();
    check_gradients(&ad, &loss, 1e-4);
}

// At init (paired u, theta = 0, m = rho) the adapted linear equals the base, and every tensor
// still gets a non-zero gradient (the paired reflections cancel in value, not in derivative).
#[test]
fn identity_at_init_with_live_gradients() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let w = randn(&[6, 10], 1.0, &mut rng, DType::F64);
    let base = Linear::new("model.layers.0.mlp.up_proj", w, None);
    let ad = RopoAdapter::init(&base, 4, 2, true, 1234).unwrap();
    let x = randn(&[4, 10], 1.0, &mut rng, DType::F64);
    let e = max_abs(&ad.forward(&base, &x).unwrap(), &base.forward_base(&x).unwrap());
    assert!(e < 1e-12, "init is not the identity: {e}");
    let p = randn(&[4, 6], 1.0, &mut rng, DType::F64);
    let loss = || ad.forward(&base, &x).unwrap().tanh().unwrap().mul(&p).unwrap().sum_all().unwrap();
    check_gradients(&ad, &loss, 1e-4);
    // same seed and path => same parameters; another path => other parameters
    let again = RopoAdapter::init(&base, 4, 2, true, 1234).unwrap();
    assert_eq!(max_abs(again.u.as_ref().unwrap(), ad.u.as_ref().unwrap()), 0.0);
    let other = RopoAdapter::init(&Linear::new("x", base.weight.clone(), None), 4, 2, true, 1234).unwrap();
    assert!(max_abs(other.u.as_ref().unwrap(), ad.u.as_ref().unwrap()) > 0.0);
}

// Ablation variants: trainable tensors present per configuration, and counts r*d + A + n.
#[test]
fn variants_have_the_right_tensors() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let base = Linear::new("l", randn(&[6, 10], 1.0, &mut rng, DType::F32), None);
    let names = |a: &RopoAdapter| a.trainable().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let full = RopoAdapter::init(&base, 4, 2, true, 0).unwrap();
    assert_eq!(names(&full), ["l.ropo_u", "l.ropo_theta", "l.ropo_magnitude"]);
    assert_eq!(full.num_trainable(), 4 * 10 + (5 + 4) + 6);
    let hra = RopoAdapter::init(&base, 2, 0, true, 0).unwrap();
    assert_eq!(names(&hra), ["l.ropo_u", "l.ropo_magnitude"]);
    let giv = RopoAdapter::init(&base, 0, 3, false, 0).unwrap();
    assert_eq!(names(&giv), ["l.ropo_theta"]);
    assert_eq!(giv.num_trainable(), 5 + 4 + 5);
    assert!(RopoAdapter::init(&base, 3, 2, true, 0).is_err());
}

// ---------------------------------------------------------------------------------------------
// Injection, files and merge on a toy stack of linears (the same code paths the Model uses
// through `Model::linears_mut`).

use ropo::adapter::ropo::{self as ropo_adapter, files, RopoConfig, RopoSet};
use ropo::adapter::targets::TargetModules;
use ropo::adapter::{inject, merge};

/// `x -> tanh(q(x)) -> tanh(o(.)) -> tanh(up(.)) -> down(.)`, paths in HF style.
fn toy(d: usize, h: usize, seed: u64, dtype: DType) -> Vec<Linear> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut mk = |path: &str, n: usize, k: usize, bias: bool| {
        let w = randn(&[n, k], 1.0 / (k as f64).sqrt(), &mut rng, dtype);
        let b = bias.then(|| randn(&[n], 0.1, &mut rng, dtype));
        Linear::new(path, w, b)
    };
    vec![
        mk("model.layers.0.self_attn.q_proj", d, d, true),
        mk("model.layers.0.self_attn.o_proj", d, d, false),
        mk("model.layers.0.mlp.up_proj", h, d, false),
        mk("model.layers.0.mlp.down_proj", d, h, false),
    ]
}

fn toy_forward(ls: &[Linear], x: &Tensor, use_adapters: bool) -> Tensor {
    let mut x = x.clone();
    for (i, l) in ls.iter().enumerate() {
        x = l.forward(&x, use_adapters).unwrap();
        if i + 1 < ls.len() {
            x = x.tanh().unwrap();
        }
    }
    x
}

fn toy_params(ls: &[Linear]) -> usize {
    ls.iter().map(|l| l.weight.elem_count() + l.bias.as_ref().map_or(0, |b| b.elem_count())).sum()
}

/// Set every adapter tensor to random non-identity values (u ~ N(0,1), theta ~ N(0,1),
/// m = rho * (1 + N(0, 0.1))).
fn randomize(set: &RopoSet, seed: u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for (name, var) in set.vars() {
        let dims = var.dims().to_vec();
        let t = randn(&dims, 1.0, &mut rng, var.dtype());
        let t = if name.ends_with("ropo_magnitude") {
            let rho = var.as_tensor().clone(); // still rho from the init
            (rho * (t * 0.1).unwrap().affine(1.0, 1.0).unwrap()).unwrap()
        } else {
            t
        };
        var.set(&t).unwrap();
    }
}

fn all_targets() -> RopoConfig {
    RopoConfig { target_modules: TargetModules::Regex(r"model\.layers\.\d+\..*_proj".into()), ..Default::default() }
}

#[test]
fn inject_identity_counts_and_order() {
    let mut ls = toy(12, 20, 1, DType::F64);
    let base_params = toy_params(&ls);
    let set = ropo_adapter::inject_linears(ls.iter_mut().collect(), &all_targets(), "toy", base_params).unwrap();
    // r*d + A + n per layer: q (12->12), o (12->12), up (12->20), down (20->12)
    let per = |n: usize, d: usize| 4 * d + givens::num_angles(d, 2) + n;
    let want = per(12, 12) * 2 + per(20, 12) + per(12, 20);
    assert_eq!(set.report.trainable, want);
    assert_eq!(set.report.total, base_params + want);
    let names: Vec<String> = set.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 12);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj.ropo_u");
    assert_eq!(names[2], "model.layers.0.self_attn.q_proj.ropo_magnitude");
    assert_eq!(names[11], "model.layers.0.mlp.down_proj.ropo_magnitude");
    let x = randn(&[3, 5, 12], 1.0, &mut ChaCha20Rng::seed_from_u64(2), DType::F64);
    let e = max_abs(&toy_forward(&ls, &x, true), &toy_forward(&ls, &x, false));
    assert!(e < 1e-10, "fresh adapters change the output by {e}");
    // default targets (q, k, v, o) match only q and o here
    let mut ls2 = toy(12, 20, 1, DType::F64);
    let set2 = ropo_adapter::inject_linears(ls2.iter_mut().collect(), &RopoConfig::default(), "toy", 0).unwrap();
    assert_eq!(set2.adapters.len(), 2);
    // injecting twice is refused
    assert!(ropo_adapter::inject_linears(ls2.iter_mut().collect(), &RopoConfig::default(), "toy", 0).is_err());
}

#[test]
fn no_match_names_the_patterns() {
    let mut ls = toy(8, 8, 1, DType::F32);
    let cfg = RopoConfig { target_modules: TargetModules::Names(vec!["c_attn".into()]), ..Default::default() };
    let e = ropo_adapter::inject_linears(ls.iter_mut().collect(), &cfg, "toy", 0).unwrap_err().to_string();
    assert!(e.contains("c_attn") && e.contains("matched no module") && e.contains("model.layers.0.self_attn.q_proj"), "{e}");
    assert!(ls.iter().all(|l| l.adapter.is_none()));
}

#[test]
fn save_load_round_trip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut ls = toy(10, 14, 3, DType::F32);
    let cfg = RopoConfig { householder_reflections: 2, givens_stages: 3, ..all_targets() };
    let set = ropo_adapter::inject_linears(ls.iter_mut().collect(), &cfg, "some/base", 0).unwrap();
    randomize(&set, 4);
    files::save(dir.path(), &set).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]); // no temp files left
    let mut fresh = toy(10, 14, 3, DType::F32);
    let loaded = files::load_linears(dir.path(), fresh.iter_mut().collect(), 0).unwrap();
    assert_eq!(loaded.config, cfg);
    assert_eq!(loaded.base_model, "some/base");
    let (a, b) = (set.vars(), loaded.vars());
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let (x, y) = (va.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vb.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{na} differs after the round trip");
    }
    let x = randn(&[2, 10], 1.0, &mut ChaCha20Rng::seed_from_u64(5), DType::F32);
    let (ya, yb) = (toy_forward(&ls, &x, true), toy_forward(&fresh, &x, true));
    assert_eq!(max_abs(&ya, &yb), 0.0);
    // saving the loaded set again gives the same bytes
    let dir2 = tempfile::tempdir().unwrap();
    files::save(dir2.path(), &loaded).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(std::fs::read(dir.path().join(f)).unwrap(), std::fs::read(dir2.path().join(f)).unwrap(), "{f}");
    }
}

#[test]
fn loading_onto_other_dimensions_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut ls = toy(10, 14, 3, DType::F32);
    let set = ropo_adapter::inject_linears(ls.iter_mut().collect(), &all_targets(), "b", 0).unwrap();
    files::save(dir.path(), &set).unwrap();
    let mut other = toy(12, 14, 3, DType::F32);
    let e = files::load_linears(dir.path(), other.iter_mut().collect(), 0).unwrap_err().to_string();
    assert_eq!(e, "shape mismatch for model.layers.0.self_attn.q_proj.ropo_u: expected [4, 12], got [4, 10]");
    assert!(other.iter().all(|l| l.adapter.is_none()), "a failed load attached adapters");
    // only the MLP width differs: q/o match, up_proj (h x d) keeps d = 10, so its magnitude is first
    let mut other = toy(10, 16, 3, DType::F32);
    let e = files::load_linears(dir.path(), other.iter_mut().collect(), 0).unwrap_err().to_string();
    assert_eq!(e, "shape mismatch for model.layers.0.mlp.up_proj.ropo_magnitude: expected [16], got [14]");
}

// Property 5 on the toy stack: merged == adapted (f32, 1e-4) and != base.
#[test]
fn merge_equals_adapted_and_differs_from_base() {
    let mut ls = toy(16, 24, 8, DType::F32);
    let set = ropo_adapter::inject_linears(ls.iter_mut().collect(), &all_targets(), "b", 0).unwrap();
    randomize(&set, 9);
    let x = randn(&[4, 16], 1.0, &mut ChaCha20Rng::seed_from_u64(10), DType::F32);
    let adapted = toy_forward(&ls, &x, true);
    let base = toy_forward(&ls, &x, false);
    assert_eq!(merge::merge_linears(ls.iter_mut().collect()).unwrap(), 4);
    assert!(ls.iter().all(|l| l.adapter.is_none()));
    let merged = toy_forward(&ls, &x, true);
    let e = max_abs(&merged, &adapted);
    assert!(e < 1e-4, "merged differs from adapted by {e}");
    assert!(max_abs(&merged, &base) > 1e-2, "adapters did nothing");
}

// ---------------------------------------------------------------------------------------------
// On the model (src/model/llama.rs): identity at init, merge equivalence, gradients, files.

use ropo::model::config::Arch;

fn batch() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 17, 3, 29, 0, 0], [11, 2, 38, 7, 7, 20]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &dev).unwrap();
    (ids, mask)
}

// Spec "Initialization": fresh adapters leave the logits equal to the base model's (f64, 1e-10),
// for every variant and for every linear targeted.
#[test]
fn model_identity_at_init_f64() {
    let (ids, mask) = batch();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut model = small_model(&tiny_config(arch, 40, 16, false), 1, DType::F64);
        let base = model.forward(&ids, Some(&mask), false).unwrap();
        for cfg in [
            RopoConfig::default(),
            RopoConfig { target_modules: TargetModules::Regex(".*".into()), ..Default::default() },
            RopoConfig { householder_reflections: 0, ..Default::default() },
            RopoConfig { givens_stages: 0, magnitude: false, householder_reflections: 6, ..Default::default() },
        ] {
            let set = ropo_adapter::inject(&mut model, &cfg, "random").unwrap();
            assert!(set.report.trainable > 0 && set.report.total > set.report.trainable);
            let adapted = model.forward(&ids, Some(&mask), true).unwrap();
            let e = max_abs(&adapted, &base);
            assert!(e < 1e-10, "{arch:?} {cfg:?}: logits moved by {e} at init");
            inject::detach(&mut model);
        }
    }
}

// Property 5: with random non-identity parameters the merged model's logits equal the adapted
// ones (f32, 1e-4) and differ from the base model's.
#[test]
fn model_merge_equivalence_f32() {
    let (ids, mask) = batch();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut model = small_model(&tiny_config(arch, 40, 16, false), 2, DType::F32);
        let cfg = RopoConfig { target_modules: TargetModules::Regex(r"model\..*".into()), ..Default::default() };
        let set = ropo_adapter::inject(&mut model, &cfg, "random").unwrap();
        assert_eq!(set.adapters.len(), 14); // 2 layers x (q, k, v, o, gate, up, down)
        randomize(&set, 3);
        let base = model.forward(&ids, Some(&mask), false).unwrap();
        let adapted = model.forward(&ids, Some(&mask), true).unwrap();
        assert_eq!(merge::merge_into(&mut model).unwrap(), 14);
        let merged = model.forward(&ids, Some(&mask), false).unwrap();
        let e = max_abs(&merged, &adapted);
        assert!(e < 1e-4, "{arch:?}: merged logits differ from adapted by {e}");
        let moved = max_abs(&merged, &base);
        assert!(moved > 1e-2, "{arch:?}: the adapters did not change the logits ({moved})");
    }
}

// Property 4 through the whole model: every adapter tensor's gradient matches central finite
// differences (f64, relative error < 1e-4), at random parameters and at init.
#[test]
fn model_gradients_match_finite_differences_f64() {
    let (ids, mask) = batch();
    let cfg = tiny_config(Arch::Llama, 40, 8, false);
    let mut model = small_model(&cfg, 4, DType::F64);
    let acfg = RopoConfig { target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]), ..Default::default() };
    let set = ropo_adapter::inject(&mut model, &acfg, "random").unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let proj = randn(&[2, 6, cfg.vocab_size], 1.0, &mut rng, DType::F64);
    let loss = || -> Tensor {
        let logits = model.forward(&ids, Some(&mask), true).unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
        (lsm * &proj).unwrap().sum_all().unwrap()
    };
    for phase in ["init", "random"] {
        if phase == "random" {
            randomize(&set, 6);
        }
        for ad in &set.adapters {
            check_gradients(ad, &loss, 1e-4);
        }
    }
}

// A saved adapter reloads onto the model bit-identically; onto a model of other dimensions it
// fails naming the first mismatching tensor, and leaves that model untouched.
#[test]
fn model_files_round_trip_and_dimension_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, mask) = batch();
    let mut model = small_model(&tiny_config(Arch::Llama, 40, 16, false), 7, DType::F32);
    let set = ropo_adapter::inject(&mut model, &RopoConfig::default(), "random/16").unwrap();
    randomize(&set, 8);
    files::save(dir.path(), &set).unwrap();
    let want = model.forward(&ids, Some(&mask), true).unwrap();
    let mut fresh = small_model(&tiny_config(Arch::Llama, 40, 16, false), 7, DType::F32);
    let loaded = files::load(dir.path(), &mut fresh).unwrap();
    assert_eq!(loaded.report, set.report);
    assert_eq!(max_abs(&fresh.forward(&ids, Some(&mask), true).unwrap(), &want), 0.0);
    let mut other = small_model(&tiny_config(Arch::Llama, 40, 32, false), 7, DType::F32);
    let e = files::load(dir.path(), &mut other).unwrap_err().to_string();
    assert_eq!(e, "shape mismatch for model.layers.0.self_attn.q_proj.ropo_u: expected [4, 32], got [4, 16]");
    assert!(other.linears().iter().all(|l| l.adapter.is_none()));
}

// ---------------------------------------------------------------------------------------------
// SmolLM2-135M (GGUF, f32) and `ropo merge`: identity at init, merge equivalence from a GGUF and
// from an HF-folder source, the merged folder loads back, OUT protection.

use ropo::model::LoadOptions;

fn smollm2_ids() -> Tensor {
    // arbitrary in-vocabulary ids (the tokenizer is not under test here)
    Tensor::new(&[[1u32, 504, 3060, 282, 2671, 30, 216, 1204, 314, 29, 1930, 2]], &Device::Cpu).unwrap()
}

// Issue acceptance: fresh adapters on SmolLM2 change the f32 logits by less than 1e-4 (paired
// reflections cancel only up to rounding).
#[test]
fn smollm2_identity_at_init_f32() {
    let gguf = common::smollm2_gguf();
    let mut loaded = ropo::model::load(gguf.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let ids = smollm2_ids();
    let base = loaded.model.forward(&ids, None, false).unwrap();
    let set = ropo_adapter::inject(&mut loaded.model, &RopoConfig::default(), "smollm2").unwrap();
    println!("{}", set.report);
    assert_eq!(set.adapters.len(), 30 * 4);
    let e = max_abs(&loaded.model.forward(&ids, None, true).unwrap(), &base);
    println!("SmolLM2 f32, fresh adapters: max |adapted - base| = {e:.3e}");
    assert!(e < 1e-4, "fresh adapters move SmolLM2's logits by {e}");
}

/// Small random non-identity adapter values: u ~ N(0, 1), theta ~ N(0, 0.05), m = rho (1 + N(0, 0.02)).
fn perturb(set: &RopoSet, seed: u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for (name, var) in set.vars() {
        let dims = var.dims().to_vec();
        let t = if name.ends_with("ropo_u") {
            randn(&dims, 1.0, &mut rng, var.dtype())
        } else if name.ends_with("ropo_theta") {
            randn(&dims, 0.05, &mut rng, var.dtype())
        } else {
            (var.as_tensor() * randn(&dims, 0.02, &mut rng, var.dtype()).affine(1.0, 1.0).unwrap()).unwrap()
        };
        var.set(&t).unwrap();
    }
}

#[test]
fn smollm2_merge_from_gguf_and_hf_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = common::smollm2_gguf();
    let gguf = gguf.to_str().unwrap();
    let ids = smollm2_ids();
    let mut loaded = ropo::model::load(gguf, &LoadOptions::default()).unwrap();
    // the base model as an HF folder, for the second source
    let base_hf = tmp.path().join("base_hf");
    loaded.export(&base_hf, DType::F32).unwrap();
    let base = loaded.model.forward(&ids, None, false).unwrap();
    let set = ropo_adapter::inject(&mut loaded.model, &RopoConfig::default(), gguf).unwrap();
    perturb(&set, 1);
    let adapted = loaded.model.forward(&ids, None, true).unwrap();
    let moved = max_abs(&adapted, &base);
    assert!(moved > 1e-2, "the adapter does not change the logits ({moved})");
    let adapter_dir = tmp.path().join("adapter");
    files::save(&adapter_dir, &set).unwrap();
    for (source, name) in [(gguf.to_string(), "merged_from_gguf"), (base_hf.to_str().unwrap().to_string(), "merged_from_hf")] {
        let out = tmp.path().join(name);
        assert_eq!(merge::merge_to_folder(&source, &Default::default(), &adapter_dir, &out, DType::F32, false).unwrap(), 120);
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{name}: {f} missing");
        }
        let merged = ropo::model::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert!(merged.model.linears().iter().all(|l| l.adapter.is_none()));
        let logits = merged.model.forward(&ids, None, false).unwrap();
        // float tolerance relative to the logits' scale (f32 rounding through 30 layers; its
        // size depends on the CPU's matmul blocking): ~3e-6 here
        let e = max_rel(&logits, &adapted);
        println!("{name}: max |merged - adapted| / max |adapted| = {e:.3e}, max |adapted - base| = {moved:.3e}");
        assert!(e < 1e-5, "{name}: merged logits differ from base+adapter by {e} of the largest logit");
        assert!(max_abs(&logits, &base) > 1e-2, "{name}: merged model equals the base");
    }
    // OUT protection: non-empty without --force is refused and left as it was
    let out = tmp.path().join("merged_from_gguf");
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let e = merge::merge_to_folder(gguf, &Default::default(), &adapter_dir, &out, DType::BF16, false).unwrap_err().to_string();
    assert!(e.contains("is not empty") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before);
    // with --force it is replaced (bf16 now: about half the bytes), and no temporary folder is left
    merge::merge_to_folder(gguf, &Default::default(), &adapter_dir, &out, DType::BF16, true).unwrap();
    let after = std::fs::metadata(out.join("model.safetensors")).unwrap().len() as f64;
    assert!((after / before.len() as f64 - 0.5).abs() < 0.05, "bf16 file is {after} bytes vs f32 {}", before.len());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "temporary folders left: {leftovers:?}");
}

// The binary: a non-empty OUT without --force exits with status 2 and names the folder; nothing
// is loaded (the model path does not even exist).
#[test]
fn cli_merge_refuses_non_empty_out() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ropo"))
        .args(["merge", "--model", "/nonexistent/model", "--adapter", "/nonexistent/adapter", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not empty (use --force to replace it)") && err.contains(tmp.path().to_str().unwrap()), "{err}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("keep.txt")).unwrap(), "x");
}

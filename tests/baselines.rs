//! The DPO baselines through the same `Adapter` trait as RoPO: LoRA (PEFT's definition and file
//! layout) and full-parameter training of the selected linears.
//!
//! On small random models (f64 for identities and finite differences, f32 for merges): identity
//! at init, central finite-difference gradients of the DPO loss for every trainable tensor,
//! merge equivalence, PEFT key names and shapes for SmolLM2-shaped layers, bit-identical file
//! round trips, "only the selected tensors change" for full training, and `ropo merge` on the
//! real SmolLM2-135M GGUF for both kinds.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use common::gradients::check_gradients;
use common::tiny::{max_abs, max_rel, randn, small_model, tiny_config};
use ropo::adapter::any::{stored_kind, AnyAdapterSet};
use ropo::adapter::inject;
use ropo::adapter::merge;
use ropo::config::{AdapterKind, AdapterSection};
use ropo::logps::{completion_logps, split_pairs};
use ropo::loss::{preference_loss, LossParams, LossType, PairLogps};
use ropo::model::config::{Arch, ModelConfig};
use ropo::model::llama::Model;

#[allow(clippy::too_many_arguments)]
fn config(arch: Arch, vocab: usize, hidden: usize, inter: usize, layers: usize, heads: usize, kv: usize, head_dim: usize) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        attention_bias: arch == Arch::Qwen2,
        bos_token_id: None,
        eos_token_ids: vec![],
        extras: Default::default(),
    }
}

/// Two preference pairs in TRL's layout `[chosen_0, chosen_1, rejected_0, rejected_1]`, right
/// padding, completion from position 3.
fn pairs() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 17, 3, 29, 8, 0], [11, 2, 38, 7, 7, 20], [5, 17, 3, 12, 0, 0], [11, 2, 38, 1, 33, 4]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &dev).unwrap();
    let comp = Tensor::new(&[[0f32, 0., 0., 1., 1., 0.], [0., 0., 0., 1., 1., 1.], [0., 0., 0., 1., 0., 0.], [0., 0., 0., 1., 1., 1.]], &dev).unwrap();
    (ids, mask, comp)
}

/// The sigmoid DPO loss (beta 0.1) of the policy (adapters on) against the reference
/// (adapters bypassed) on [`pairs`].
fn dpo_loss(model: &Model) -> Tensor {
    let (ids, mask, comp) = pairs();
    let pol = completion_logps(&model.forward(&ids, Some(&mask), true).unwrap(), &ids, &comp).unwrap();
    let rf = completion_logps(&model.forward(&ids, Some(&mask), false).unwrap(), &ids, &comp).unwrap().detach();
    let (pc, pr) = split_pairs(&pol).unwrap();
    let (rc, rr) = split_pairs(&rf).unwrap();
    let ones = Tensor::ones(2, pc.dtype(), &Device::Cpu).unwrap();
    let logps = PairLogps {
        policy_chosen: pc,
        policy_rejected: pr,
        reference_chosen: rc,
        reference_rejected: rr,
        chosen_tokens: ones.clone(),
        rejected_tokens: ones,
    };
    preference_loss(LossType::Sigmoid, &logps, &LossParams::default(), None).unwrap().loss
}

fn section(kind: AdapterKind, targets: &[&str]) -> AdapterSection {
    AdapterSection { kind, target_modules: targets.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// Set every LoRA B (and A) to random values, so the adapter is not the identity.
fn randomize(set: &AnyAdapterSet, seed: u64, std: f64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for (_, var) in set.vars() {
        let dims = var.dims().to_vec();
        let t = (var.as_tensor() + randn(&dims, std, &mut rng, var.dtype())).unwrap();
        var.set(&t).unwrap();
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// The save -> load round trip of `set`, saved in `dir` from a seed-7 Qwen2
/// `tiny_config(.., 40, 16, ..)` model whose adapted logits on [`pairs`] are `want`: loaded onto
/// a fresh copy of that model, the kind, report and every tensor are the same (bit for bit), so
/// are the logits, and saving again writes the same bytes; loading onto a 32-wide model fails
/// with exactly `mismatch` and attaches nothing. Returns the loaded set.
fn check_round_trip(set: &AnyAdapterSet, dir: &Path, want: &Tensor, mismatch: &str) -> AnyAdapterSet {
    let (ids, mask, _) = pairs();
    let mut fresh = small_model(&tiny_config(Arch::Qwen2, 40, 16, false), 7, DType::F32);
    let loaded = AnyAdapterSet::load(dir, &mut fresh).unwrap();
    assert_eq!((loaded.kind(), loaded.report()), (set.kind(), set.report()));
    for ((na, va), (nb, vb)) in set.vars().iter().zip(&loaded.vars()) {
        assert_eq!(na, nb);
        assert_eq!(bits(va.as_tensor()), bits(vb.as_tensor()), "{na}");
    }
    assert_eq!(max_abs(&fresh.forward(&ids, Some(&mask), true).unwrap(), want), 0.0);
    let dir2 = tempfile::tempdir().unwrap();
    loaded.save(dir2.path()).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(std::fs::read(dir.join(f)).unwrap(), std::fs::read(dir2.path().join(f)).unwrap(), "{f}");
    }
    let mut other = small_model(&tiny_config(Arch::Qwen2, 40, 32, false), 7, DType::F32);
    let e = AnyAdapterSet::load(dir, &mut other).unwrap_err().to_string();
    assert_eq!(e, mismatch);
    assert!(other.linears().iter().all(|l| l.adapter.is_none()));
    loaded
}

// ---------------------------------------------------------------------------------------------
// LoRA

// B = 0 at init: every logit equals the base model's exactly (f64), for Llama and Qwen2 (biases).
#[test]
fn lora_identity_at_init_f64() {
    let (ids, mask, _) = pairs();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut model = small_model(&tiny_config(arch, 40, 16, false), 1, DType::F64);
        let base = model.forward(&ids, Some(&mask), false).unwrap();
        let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Lora, &["all-linear"]), "random").unwrap();
        assert_eq!(set.module_paths().len(), 14, "all-linear: 2 layers x 7, not lm_head");
        assert!(!set.module_paths().iter().any(|p| p == "lm_head"));
        // r (d_in + d_out) per layer: q,o (16,16) k,v (16->8) gate,up (16->24) down (24->16)
        let per_layer = 8 * ((16 + 16) * 2 + (16 + 8) * 2 + (16 + 24) * 2 + (24 + 16));
        assert_eq!(set.report().trainable, 2 * per_layer);
        assert_eq!(set.report().total, inject::model_params(&model) + 2 * per_layer);
        let adapted = model.forward(&ids, Some(&mask), true).unwrap();
        assert_eq!(max_abs(&adapted, &base), 0.0, "{arch:?}: fresh LoRA changed the logits");
        assert!((dpo_loss(&model).to_scalar::<f64>().unwrap() - std::f64::consts::LN_2).abs() < 1e-12);
    }
}

// The DPO loss's gradients of every lora_A and lora_B (B random, non-zero) match central finite
// differences (f64, relative error < 1e-4).
#[test]
fn lora_gradients_match_finite_differences_f64() {
    let mut model = small_model(&tiny_config(Arch::Qwen2, 40, 8, false), 4, DType::F64);
    let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Lora, &["q_proj", "v_proj", "down_proj"]), "random").unwrap();
    randomize(&set, 5, 0.3);
    let vars = set.vars();
    assert_eq!(vars.len(), 2 * 3 * 2);
    assert_eq!(vars[0].0, "model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_eq!(vars[1].0, "model.layers.0.self_attn.q_proj.lora_B.weight");
    check_gradients(&vars, &|| dpo_loss(&model), 1e-4);
}

// Random A and B: the merged model's logits equal the adapted ones (f32, 1e-4) and differ from
// the base model's; merged W = W + (alpha / r) B A.
#[test]
fn lora_merge_equivalence_f32() {
    let (ids, mask, _) = pairs();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut model = small_model(&tiny_config(arch, 40, 16, false), 2, DType::F32);
        let sec = AdapterSection { lora_r: 4, lora_alpha: 8.0, ..section(AdapterKind::Lora, &["all-linear"]) };
        let set = AnyAdapterSet::inject(&mut model, &sec, "random").unwrap();
        randomize(&set, 3, 0.3);
        let base = model.forward(&ids, Some(&mask), false).unwrap();
        let adapted = model.forward(&ids, Some(&mask), true).unwrap();
        let AnyAdapterSet::Lora(lora) = &set else { panic!("not LoRA") };
        let q = &lora.adapters[0];
        let want_q = (model.linears()[0].weight.to_dtype(DType::F64).unwrap()
            + (q.b.as_tensor().to_dtype(DType::F64).unwrap().matmul(&q.a.as_tensor().to_dtype(DType::F64).unwrap()).unwrap() * 2.0).unwrap())
        .unwrap();
        assert_eq!(merge::merge_into(&mut model).unwrap(), 14);
        assert!(max_abs(&model.linears()[0].weight, &want_q) < 1e-6);
        let merged = model.forward(&ids, Some(&mask), false).unwrap();
        let e = max_abs(&merged, &adapted);
        assert!(e < 1e-4, "{arch:?}: merged logits differ from adapted by {e}");
        assert!(max_abs(&merged, &base) > 1e-2, "{arch:?}: LoRA did not change the logits");
    }
}

// PEFT's layout for SmolLM2-135M-shaped layers (hidden 576, 9 heads, 3 KV heads, head_dim 64,
// intermediate 1536): keys `base_model.model.<path>.lora_A.weight [r, d_in]`,
// `….lora_B.weight [d_out, r]`, and PEFT's adapter_config.json fields.
#[test]
fn lora_files_follow_peft_layout_for_smollm2_shapes() {
    let cfg = config(Arch::Llama, 64, 576, 1536, 2, 9, 3, 64);
    let mut model = small_model(&cfg, 9, DType::F32);
    let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Lora, &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]), "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    let dir = tempfile::tempdir().unwrap();
    set.save(dir.path()).unwrap();
    let st = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let mut shapes: BTreeMap<String, Vec<usize>> = st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
    assert_eq!(shapes.len(), 2 * 5 * 2);
    let p = "base_model.model.model.layers.0";
    assert_eq!(shapes.remove(&format!("{p}.self_attn.q_proj.lora_A.weight")).unwrap(), [8, 576]);
    assert_eq!(shapes.remove(&format!("{p}.self_attn.q_proj.lora_B.weight")).unwrap(), [576, 8]);
    assert_eq!(shapes.remove(&format!("{p}.self_attn.k_proj.lora_A.weight")).unwrap(), [8, 576]);
    assert_eq!(shapes.remove(&format!("{p}.self_attn.k_proj.lora_B.weight")).unwrap(), [192, 8]);
    assert_eq!(shapes.remove(&format!("{p}.mlp.down_proj.lora_A.weight")).unwrap(), [8, 1536]);
    assert_eq!(shapes.remove(&format!("{p}.mlp.down_proj.lora_B.weight")).unwrap(), [576, 8]);
    assert!(shapes.keys().all(|k| k.starts_with("base_model.model.model.layers.") && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))));
    let st_bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&st_bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 8);
    assert_eq!(c["lora_alpha"], 16);
    assert_eq!(c["lora_dropout"], 0.0);
    assert_eq!(c["fan_in_fan_out"], false);
    assert_eq!(c["bias"], "none");
    assert_eq!(c["use_dora"], false);
    assert_eq!(c["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(c["target_modules"], serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]));
    assert_eq!(stored_kind(dir.path()).unwrap(), AdapterKind::Lora);
}

// Save -> load is bit-identical (tensors, logits, and the re-saved bytes); loading onto a model
// of other dimensions names the first mismatching PEFT key and leaves the model untouched.
#[test]
fn lora_round_trip_is_bit_identical_and_mismatch_is_named() {
    let (ids, mask, _) = pairs();
    let dir = tempfile::tempdir().unwrap();
    let mut model = small_model(&tiny_config(Arch::Qwen2, 40, 16, false), 7, DType::F32);
    let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Lora, &["all-linear"]), "random/16").unwrap();
    randomize(&set, 8, 0.3);
    set.save(dir.path()).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    let want = model.forward(&ids, Some(&mask), true).unwrap();
    let loaded = check_round_trip(&set, dir.path(), &want, "shape mismatch for base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: expected [8, 32], got [8, 16]");
    assert_eq!(loaded.kind(), AdapterKind::Lora);
    assert_eq!(loaded.base_model(), "random/16");
}

// ---------------------------------------------------------------------------------------------
// Full-parameter training

// The trainable copies equal the frozen weights: logits identical (f64, exactly), DPO loss ln 2.
#[test]
fn full_identity_at_init_f64() {
    let (ids, mask, _) = pairs();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let mut model = small_model(&tiny_config(arch, 40, 16, false), 1, DType::F64);
        let base = model.forward(&ids, Some(&mask), false).unwrap();
        let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Full, &["all-linear"]), "random").unwrap();
        let layer_params: usize = model.linears().iter().filter(|l| l.path != "lm_head").map(|l| l.weight.elem_count() + l.bias.as_ref().map_or(0, |b| b.elem_count())).sum();
        assert_eq!(set.report().trainable, layer_params);
        assert_eq!(set.report().total, inject::model_params(&model));
        assert_eq!(max_abs(&model.forward(&ids, Some(&mask), true).unwrap(), &base), 0.0);
        let loss = dpo_loss(&model).to_scalar::<f64>().unwrap();
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-12, "{arch:?}: step-0 loss {loss}");
    }
}

// The DPO loss's gradient of every trained weight and bias matches finite differences (f64),
// at init (the reference is the frozen base, so the copies get a gradient from step 0).
#[test]
fn full_gradients_match_finite_differences_f64() {
    let mut model = small_model(&tiny_config(Arch::Qwen2, 40, 8, false), 4, DType::F64);
    let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Full, &["q_proj", "down_proj"]), "random").unwrap();
    let vars = set.vars();
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.bias",
            "model.layers.1.mlp.down_proj.weight"
        ]
    );
    check_gradients(&vars, &|| dpo_loss(&model), 1e-4);
    // and at a point away from init
    randomize(&set, 6, 0.05);
    check_gradients(&vars, &|| dpo_loss(&model), 1e-4);
}

// After a gradient step only the selected tensors differ from the base: the frozen weights
// (and so the reference) never move; merging writes exactly the trained tensors.
#[test]
fn full_step_changes_only_selected_tensors() {
    let mut model = small_model(&tiny_config(Arch::Qwen2, 40, 16, false), 3, DType::F32);
    let before: BTreeMap<String, Tensor> = model.tensors().into_iter().collect();
    let (ids, mask, _) = pairs();
    let ref_logits = model.forward(&ids, Some(&mask), false).unwrap();
    let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Full, &[r"model\.layers\.1\.self_attn\.(q|v)_proj"]), "random").unwrap();
    let grads = dpo_loss(&model).backward().unwrap();
    for (name, var) in set.vars() {
        let g = grads.get(&var).unwrap_or_else(|| panic!("no gradient for {name}"));
        var.set(&(var.as_tensor() - (g * 10.0).unwrap()).unwrap()).unwrap();
    }
    assert!(dpo_loss(&model).to_scalar::<f32>().unwrap() < std::f32::consts::LN_2, "the step did not lower the loss");
    // the frozen weights and the reference model are untouched
    for (name, t) in model.tensors() {
        assert_eq!(bits(&t), bits(&before[&name]), "{name} (frozen) changed");
    }
    assert_eq!(max_abs(&model.forward(&ids, Some(&mask), false).unwrap(), &ref_logits), 0.0);
    let adapted = model.forward(&ids, Some(&mask), true).unwrap();
    assert_eq!(merge::merge_into(&mut model).unwrap(), 2);
    assert_eq!(max_abs(&model.forward(&ids, Some(&mask), false).unwrap(), &adapted), 0.0);
    let trained: BTreeMap<String, Tensor> = set.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let mut changed = Vec::new();
    for (name, t) in model.tensors() {
        if bits(&t) != bits(&before[&name]) {
            changed.push(name.clone());
            assert_eq!(bits(&t), bits(&trained[&name]), "{name}: merged != trained");
        }
    }
    assert_eq!(
        changed,
        ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.bias"]
    );
}

// Save -> load bit-identical; HF names in the file; other dimensions name the first tensor.
#[test]
fn full_round_trip_and_mismatch() {
    let (ids, mask, _) = pairs();
    let dir = tempfile::tempdir().unwrap();
    let mut model = small_model(&tiny_config(Arch::Qwen2, 40, 16, false), 7, DType::F32);
    let set = AnyAdapterSet::inject(&mut model, &section(AdapterKind::Full, &["k_proj", "up_proj"]), "random/16").unwrap();
    randomize(&set, 8, 0.1);
    set.save(dir.path()).unwrap();
    assert_eq!(stored_kind(dir.path()).unwrap(), AdapterKind::Full);
    let st = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    keys.sort();
    assert_eq!(keys.len(), 6);
    assert!(keys.contains(&"model.layers.0.self_attn.k_proj.bias".to_string()) && keys.contains(&"model.layers.1.mlp.up_proj.weight".to_string()));
    let want = model.forward(&ids, Some(&mask), true).unwrap();
    let loaded = check_round_trip(&set, dir.path(), &want, "shape mismatch for model.layers.0.self_attn.k_proj.weight: expected [16, 32], got [8, 16]");
    assert_eq!(loaded.kind(), AdapterKind::Full);
}

#[test]
fn unknown_adapter_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), r#"{"peft_type": "IA3"}"#).unwrap();
    let e = stored_kind(dir.path()).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json: unknown adapter type") && e.contains("IA3"), "{e}");
    let mut model = small_model(&tiny_config(Arch::Llama, 40, 8, false), 1, DType::F32);
    assert!(AnyAdapterSet::load(dir.path(), &mut model).is_err());
    assert!(AnyAdapterSet::load(Path::new("/nonexistent/adapter"), &mut model).unwrap_err().to_string().contains("/nonexistent/adapter/adapter_config.json"));
}

// ---------------------------------------------------------------------------------------------
// `ropo merge` on the real SmolLM2-135M GGUF, for LoRA and full: the merged HF folder loads back
// and its logits equal the adapted model's; for full, the written tensors are the trained ones
// and every other tensor is the base's.

#[test]
fn merge_to_folder_smollm2_lora_and_full() {
    use ropo::model::{load, LoadOptions};
    let gguf = common::smollm2_gguf();
    let src = gguf.to_str().unwrap();
    let ids = Tensor::new(&[[1u32, 504, 3458, 282, 260, 2619, 30]], &Device::Cpu).unwrap();
    for (kind, targets) in [(AdapterKind::Lora, vec!["q_proj", "v_proj"]), (AdapterKind::Full, vec![r"model\.layers\.3\.mlp\.down_proj"])] {
        let mut lm = load(src, &LoadOptions::default()).unwrap();
        let base: BTreeMap<String, Tensor> = lm.model.tensors().into_iter().collect();
        let base_logits = lm.model.forward(&ids, None, false).unwrap();
        let set = AnyAdapterSet::inject(&mut lm.model, &section(kind, &targets), src).unwrap();
        randomize(&set, 11, 0.02);
        let adapted = lm.model.forward(&ids, None, true).unwrap();
        // the adapter moves the logits by far more than the merge's tolerance below, so a merge
        // that drops it cannot pass
        let moved = max_rel(&adapted, &base_logits);
        println!("{kind:?}: max |adapted - base| / max |base| = {moved:.3e}");
        assert!(moved > 1e-3, "{kind:?}: the adapter moves the logits by only {moved} of the largest");
        let adir = tempfile::tempdir().unwrap();
        set.save(adir.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let out = out.path().join("merged");
        merge::merge_to_folder(src, &Default::default(), adir.path(), &out, DType::F32, false).unwrap();
        let merged = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        // relative to the logits' scale, as tests/adapter.rs's merge of SmolLM2
        let e = max_rel(&merged.model.forward(&ids, None, false).unwrap(), &adapted);
        assert!(e < 1e-5, "{kind:?}: merged folder logits differ from adapted by {e} of the largest logit");
        if kind == AdapterKind::Full {
            let trained: BTreeMap<String, Tensor> = set.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
            for (name, t) in merged.model.tensors() {
                let want = trained.get(&name).unwrap_or(&base[&name]);
                assert_eq!(bits(&t), bits(want), "{name}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// configs/compare/*.toml: the three variants load and validate, and differ only in [adapter],
// the learning rate and the output folder (same model, data split, seed and budget).

#[test]
fn compare_configs_load_and_differ_only_in_adapter_and_lr() {
    use ropo::config::RunConfig;
    let load = |name: &str| RunConfig::load(Some(Path::new(&format!("configs/compare/{name}.toml"))), &[]).unwrap();
    let (ropo_c, lora_c, full_c) = (load("ropo"), load("lora"), load("full"));
    assert_eq!((ropo_c.adapter.kind, lora_c.adapter.kind, full_c.adapter.kind), (AdapterKind::Ropo, AdapterKind::Lora, AdapterKind::Full));
    assert_eq!(ropo_c.adapter, AdapterSection::default());
    assert_eq!((lora_c.adapter.lora_r, lora_c.adapter.lora_alpha, lora_c.adapter.lora_dropout), (8, 16.0, 0.0));
    assert_eq!(lora_c.adapter.target_modules, ropo_c.adapter.target_modules);
    assert_eq!(full_c.adapter.target_modules, ["all-linear"]);
    let same = |c: &RunConfig| {
        let mut c = c.clone();
        c.adapter = AdapterSection::default();
        c.training.learning_rate = 0.0;
        c.training.output_dir = String::new();
        c
    };
    assert_eq!(same(&ropo_c), same(&lora_c));
    assert_eq!(same(&ropo_c), same(&full_c));
    assert_eq!(ropo_c.data.train_rows.unwrap().resolve(284), 0..200);
    assert_eq!(ropo_c.data.eval_rows.unwrap().resolve(284), 200..284);
}

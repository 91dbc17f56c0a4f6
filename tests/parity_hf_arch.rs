//! Parity against transformers itself for the newer architectures (today Qwen3): tiny random
//! models saved by transformers' `save_pretrained`, with the float32 logits, per-token log-probs
//! and chat-template renderings transformers computed for them (tests/fixtures/arch/<family>/,
//! made by scripts/make_arch_fixtures.py with the anchor venv, transformers 5.24, torch 2.15).
//!
//! - the padded batch (right padding, attention mask) and generation with the KV cache match
//!   transformers' logits and log-probs within 1e-4 at every real position;
//! - the chat template renders (and tokenizes) as transformers' `apply_chat_template`;
//! - RoPO, LoRA and full adapters on the projections: identity at init, `ropo merge` to an HF
//!   folder that ropo loads back with the adapter's logits (1e-4); with
//!   `ROPO_ARCH_MERGED_OUT=DIR` the RoPO-merged folder and its expected logits are also written
//!   to DIR for `scripts/make_arch_fixtures.py --check-merged DIR` (transformers loads it);
//! - identity at init: the DPO loss is ln 2 with a fresh RoPO adapter, and AdamW steps lower it.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use common::tiny::{max_abs, randn};
use rand::SeedableRng;
use ropo::adapter::any::AnyAdapterSet;
use ropo::adapter::merge;
use ropo::config::{AdapterKind, AdapterSection};
use ropo::data::template::{ChatTemplate, Message};
use ropo::logps::{completion_logps, split_pairs};
use ropo::loss::{preference_loss, LossParams, LossType, PairLogps};
use ropo::model::config::Arch;
use ropo::model::llama::{KvCache, Model};
use ropo::model::{LoadOptions, LoadedModel};
use serde_json::Value;

/// tests/fixtures/arch/`family`.
fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch").join(family)
}

/// The fixture's expected.json.
fn expected(family: &str) -> Value {
    let p = fixture(family).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn load(family: &str, dtype: DType) -> LoadedModel {
    let opts = LoadOptions { dtype, ..Default::default() };
    ropo::model::load(fixture(family).to_str().unwrap(), &opts).unwrap()
}

/// A JSON array of arrays (of arrays) of numbers as an f32 tensor of its nested shape.
fn tensor(v: &Value) -> Tensor {
    fn walk(v: &Value, depth: usize, dims: &mut Vec<usize>, out: &mut Vec<f32>) {
        match v {
            Value::Array(items) => {
                if dims.len() == depth {
                    dims.push(items.len());
                }
                items.iter().for_each(|x| walk(x, depth + 1, dims, out));
            }
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let (mut dims, mut out) = (vec![], vec![]);
    walk(v, 0, &mut dims, &mut out);
    Tensor::from_vec(out, dims, &Device::Cpu).unwrap()
}

fn ids_of(v: &Value) -> Tensor {
    tensor(v).to_dtype(DType::U32).unwrap()
}

/// The real length of each row of the mask.
fn lengths(mask: &Value) -> Vec<usize> {
    mask.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().filter(|x| x.as_u64() == Some(1)).count()).collect()
}

/// `log p(ids[t] | ids[<t])`, `(N, T-1)`, from logits `(N, T, V)`.
fn token_logps(logits: &Tensor, ids: &Tensor) -> Tensor {
    let t = logits.dim(1).unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1).unwrap(), D::Minus1).unwrap();
    let next = ids.narrow(1, 1, t - 1).unwrap().unsqueeze(2).unwrap().contiguous().unwrap();
    lsm.gather(&next, D::Minus1).unwrap().squeeze(2).unwrap()
}

/// max |a - b| over the first `lens[n]` positions of each row `n` of `(N, T, ...)` tensors.
fn max_abs_real(a: &Tensor, b: &Tensor, lens: &[usize]) -> f64 {
    lens.iter().enumerate().map(|(n, &l)| max_abs(&a.i((n, 0..l)).unwrap(), &b.i((n, 0..l)).unwrap())).fold(0.0, f64::max)
}

#[test]
fn qwen3_fixture_resolves_as_qwen3() {
    let m = load("qwen3", DType::F32);
    let c = &m.config;
    assert_eq!(c.arch, Arch::Qwen3);
    assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (64, 4, 2, 32), "head_dim != hidden / heads");
    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6), "rope_theta read from transformers 5's rope_parameters");
    assert!(c.tie_word_embeddings && !c.attention_bias);
    let names: Vec<String> = m.model.tensors().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"model.layers.1.self_attn.q_norm.weight".to_string()) && names.contains(&"model.layers.1.self_attn.k_norm.weight".to_string()));
    assert!(!names.contains(&"lm_head.weight".to_string()), "tied: no separate head");
    assert_eq!(m.tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
}

/// The right-padded batch: logits and per-token log-probs at every real position equal
/// transformers' (eager attention, float32) within 1e-4.
#[test]
fn qwen3_padded_batch_matches_transformers() {
    let e = expected("qwen3");
    let m = load("qwen3", DType::F32);
    let (ids, mask) = (ids_of(&e["input_ids"]), ids_of(&e["attention_mask"]));
    let lens = lengths(&e["attention_mask"]);
    let logits = m.model.forward(&ids, Some(&mask), false).unwrap();
    let want = tensor(&e["logits"]);
    let scale = max_abs(&want, &want.zeros_like().unwrap());
    let d = max_abs_real(&logits, &want, &lens);
    let lp = token_logps(&logits, &ids);
    let lens_lp: Vec<usize> = lens.iter().map(|l| l - 1).collect();
    let dl = max_abs_real(&lp, &tensor(&e["token_logps"]), &lens_lp);
    println!("qwen3 padded batch vs transformers: max |d logits| = {d:.3e} (max |logit| {scale:.3}), max |d log-prob| = {dl:.3e}");
    assert!(scale > 1.0, "logits too small to compare ({scale})");
    assert!(d < 1e-4, "logits differ from transformers' by {d}");
    assert!(dl < 1e-4, "token log-probs differ from transformers' by {dl}");
}

/// Generation with the KV cache, each row on its own (prefill of 4, then one token at a time):
/// the logits equal transformers' batch logits at the same positions within 1e-4.
#[test]
fn qwen3_kv_cache_matches_transformers() {
    let e = expected("qwen3");
    let m = load("qwen3", DType::F32);
    let ids = ids_of(&e["input_ids"]);
    let want = tensor(&e["logits"]);
    let mut worst = 0f64;
    for (n, len) in lengths(&e["attention_mask"]).into_iter().enumerate() {
        let row = ids.i((n..n + 1, 0..len)).unwrap();
        let mut cache = KvCache::new(&m.config);
        let mut chunks = vec![(0usize, 4usize)];
        chunks.extend((4..len).map(|p| (p, 1)));
        for (start, l) in chunks {
            let step = m.model.forward_with_cache(&row.narrow(1, start, l).unwrap(), &mut cache, false).unwrap();
            let d = max_abs(&step.i(0).unwrap(), &want.i((n, start..start + l)).unwrap());
            assert!(d < 1e-4, "row {n}, cached positions {start}..{}: logits differ from transformers' by {d}", start + l);
            worst = worst.max(d);
        }
        assert_eq!(cache.len(), len);
    }
    println!("qwen3 KV cache vs transformers: max |d logits| = {worst:.3e}");
}

/// Qwen3's template (thinking tags: `<think>` blocks of earlier turns dropped, the last kept)
/// renders as transformers' `apply_chat_template`, with and without the generation prompt, and
/// the rendering tokenizes to transformers' ids.
#[test]
fn qwen3_chat_template_renders_like_transformers() {
    let e = expected("qwen3");
    let m = load("qwen3", DType::F32);
    let t = &m.tokenizer;
    let src = t.chat_template.as_deref().expect("chat_template.jinja is read");
    let tmpl = ChatTemplate::new(src, t.bos_token.as_deref(), t.eos_token.as_deref()).unwrap();
    let cases = e["chat_template"].as_object().unwrap();
    assert!(cases.len() >= 5);
    for (name, case) in cases {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        for agp in [false, true] {
            let want = case[format!("add_generation_prompt_{agp}")].as_str().unwrap();
            assert_eq!(tmpl.render(&msgs, agp).unwrap(), want, "{name}, add_generation_prompt {agp}");
        }
        // the special tokens of the rendering are single tokens, as transformers splits them
        let text = case["add_generation_prompt_false"].as_str().unwrap();
        let got = t.inner.encode(text, false).unwrap().get_ids().to_vec();
        let want: Vec<u32> = case["ids_add_generation_prompt_false"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(got, want, "{name}: token ids");
    }
    let think = cases["assistant_with_think"]["add_generation_prompt_false"].as_str().unwrap();
    assert!(think.ends_with("<|im_start|>assistant\n<think>\nadd them\n</think>\n\n5<|im_end|>\n"), "{think:?}");
}

/// The data rule on Qwen3's template: a conversational pair tokenizes to TRL's ids (prompt with
/// the generation prompt; completion = the final assistant turn as the template writes it, the
/// empty `<think>\n\n</think>\n\n` block Qwen3 puts before a non-thinking answer included,
/// then `<|im_end|>\n`), and the pair keeps the rule (no violation).
#[test]
fn qwen3_pair_tokenizes_as_trl() {
    use ropo::data::tokenize::{PairTokenizer, TokenizeOptions};
    use ropo::data::{DataReport, Pair, PreferenceExample};
    let e = expected("qwen3");
    let p = &e["dpo_pair"];
    let m = load("qwen3", DType::F32);
    let pt = PairTokenizer::new(&m.tokenizer, None, TokenizeOptions { max_length: None, max_prompt_length: None }).unwrap();
    let msgs = |k: &str| -> Vec<Message> { serde_json::from_value(p["pair"][k].clone()).unwrap() };
    let ex = PreferenceExample { line: 1, pair: Pair::Chat { prompt: msgs("prompt"), chosen: msgs("chosen"), rejected: msgs("rejected") } };
    let mut report = DataReport::default();
    let t = pt.tokenize(&ex, std::path::Path::new("pair.jsonl"), &mut report).unwrap().expect("the pair is kept");
    let ids = |k: &str| -> Vec<u32> { p[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    assert_eq!(t.prompt_ids, ids("prompt_ids"));
    assert_eq!(t.chosen_ids, ids("chosen_ids"), "chosen: {:?}", p["chosen_text"]);
    assert_eq!(t.rejected_ids, ids("rejected_ids"));
    assert_eq!(p["chosen_text"].as_str(), Some("<think>\n\n</think>\n\nParis.<|im_end|>\n"));
    assert_eq!(pt.violation(&t), None);
}

fn section(kind: AdapterKind) -> AdapterSection {
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    AdapterSection { kind, target_modules: targets.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// Moves every adapter tensor off its initial value (`+ N(0, std^2)`; RoPO's angles and
/// magnitudes only by a little, as tests/adapter.rs `perturb`).
fn perturb(set: &AnyAdapterSet, seed: u64) {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    for (name, var) in set.vars() {
        let std = if name.ends_with("ropo_u") { 1.0 } else { 0.05 };
        let dims = var.dims().to_vec();
        var.set(&(var.as_tensor() + randn(&dims, std, &mut rng, var.dtype())).unwrap()).unwrap();
    }
}

/// The optional `ROPO_ARCH_MERGED_OUT` copy of a merged folder, with ropo's adapted logits of
/// the fixture batch as expected_logits.json (for `make_arch_fixtures.py --check-merged`).
fn keep_merged(out: &std::path::Path, adapted: &Tensor) {
    let Ok(dir) = std::env::var("ROPO_ARCH_MERGED_OUT") else { return };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(out).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let logits: Vec<Vec<Vec<f32>>> = adapted.to_vec3().unwrap();
    std::fs::write(dir.join("expected_logits.json"), serde_json::json!({ "logits": logits }).to_string()).unwrap();
    println!("merged folder and expected logits written to {}", dir.display());
}

/// RoPO, LoRA and full adapters on every projection (HF names q_proj ... down_proj): the identity
/// at init; perturbed, `ropo merge` writes a Qwen3 HF folder (model_type, architectures, q/k
/// norms) that loads back with the adapted logits (1e-4) and differs from the base.
#[test]
fn qwen3_adapters_merge_round_trip() {
    let e = expected("qwen3");
    let (ids, mask) = (ids_of(&e["input_ids"]), ids_of(&e["attention_mask"]));
    let lens = lengths(&e["attention_mask"]);
    let source = fixture("qwen3");
    let tmp = tempfile::tempdir().unwrap();
    for (i, kind) in [AdapterKind::Ropo, AdapterKind::Lora, AdapterKind::Full].into_iter().enumerate() {
        let mut m = load("qwen3", DType::F32);
        let base = m.model.forward(&ids, Some(&mask), false).unwrap();
        let set = AnyAdapterSet::inject(&mut m.model, &section(kind), source.to_str().unwrap()).unwrap();
        assert_eq!(set.vars().iter().filter(|(n, _)| n.contains("q_norm") || n.contains("k_norm")).count(), 0);
        let init = max_abs_real(&m.model.forward(&ids, Some(&mask), true).unwrap(), &base, &lens);
        assert!(init < 1e-5, "{kind:?}: a fresh adapter moves the logits by {init}");
        perturb(&set, 10 + i as u64);
        let adapted = m.model.forward(&ids, Some(&mask), true).unwrap();
        let adapter_dir = tmp.path().join(format!("adapter_{i}"));
        set.save(&adapter_dir).unwrap();
        let out = tmp.path().join(format!("merged_{i}"));
        assert_eq!(merge::merge_to_folder(source.to_str().unwrap(), &Default::default(), &adapter_dir, &out, DType::F32, false).unwrap(), 14);
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!((cfg["model_type"].as_str(), cfg["architectures"][0].as_str()), (Some("qwen3"), Some("Qwen3ForCausalLM")));
        assert_eq!((cfg["head_dim"].as_u64(), cfg["use_sliding_window"].as_bool(), cfg["tie_word_embeddings"].as_bool()), (Some(32), Some(false), Some(true)));
        let merged = ropo::model::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert_eq!(merged.config, m.config);
        let logits = merged.model.forward(&ids, Some(&mask), false).unwrap();
        let d = max_abs_real(&logits, &adapted, &lens);
        let moved = max_abs_real(&adapted, &base, &lens);
        println!("qwen3 {kind:?}: max |merged - adapted| = {d:.3e}, max |adapted - base| = {moved:.3e}");
        assert!(d < 1e-4, "{kind:?}: merged logits differ from the adapter's by {d}");
        assert!(moved > 1e-2, "{kind:?}: the adapter does not change the logits ({moved})");
        let base_norm = &m.model.layers[1].self_attn.k_norm;
        let merged_norm = &merged.model.layers[1].self_attn.k_norm;
        assert_eq!(max_abs(base_norm.as_ref().unwrap(), merged_norm.as_ref().unwrap()), 0.0, "k_norm written back");
        if kind == AdapterKind::Ropo {
            keep_merged(&out, &adapted);
        }
    }
}

/// TRL's layout `[chosen_0, chosen_1, rejected_0, rejected_1]`, completions from position 3.
fn pairs() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 17, 3, 29, 8, 0], [11, 2, 38, 7, 7, 20], [5, 17, 3, 12, 0, 0], [11, 2, 38, 1, 33, 4]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &dev).unwrap();
    let comp = Tensor::new(&[[0f64, 0., 0., 1., 1., 0.], [0., 0., 0., 1., 1., 1.], [0., 0., 0., 1., 0., 0.], [0., 0., 0., 1., 1., 1.]], &dev).unwrap();
    (ids, mask, comp)
}

/// The sigmoid DPO loss (beta 0.1) of the policy (adapters on) against the reference (bypassed).
fn dpo_loss(model: &Model) -> Tensor {
    let (ids, mask, comp) = pairs();
    let pol = completion_logps(&model.forward(&ids, Some(&mask), true).unwrap(), &ids, &comp).unwrap();
    let rf = completion_logps(&model.forward(&ids, Some(&mask), false).unwrap(), &ids, &comp).unwrap().detach();
    let ((pc, pr), (rc, rr)) = (split_pairs(&pol).unwrap(), split_pairs(&rf).unwrap());
    let ones = Tensor::ones(2, pc.dtype(), &Device::Cpu).unwrap();
    let logps = PairLogps { policy_chosen: pc, policy_rejected: pr, reference_chosen: rc, reference_rejected: rr, chosen_tokens: ones.clone(), rejected_tokens: ones };
    preference_loss(LossType::Sigmoid, &logps, &LossParams::default(), None).unwrap().loss
}

/// A fresh RoPO adapter (the default q/k/v/o targets) on the tiny Qwen3 (f64): the DPO loss is
/// ln 2; ten AdamW steps on it (lr 1e-2) lower it.
#[test]
fn qwen3_identity_at_init_loss_ln2_and_steps_lower_it() {
    let mut m = load("qwen3", DType::F64);
    let set = AnyAdapterSet::inject(&mut m.model, &AdapterSection::default(), "qwen3").unwrap();
    let params = set.vars();
    assert_eq!(params.len(), 2 * 4 * 3, "u, theta, m on q, k, v, o of 2 layers");
    let l0 = dpo_loss(&m.model).to_scalar::<f64>().unwrap();
    assert!((l0 - std::f64::consts::LN_2).abs() < 1e-12, "step-0 loss {l0}, want ln 2");
    let mut opt = ropo::optim::AdamW::new(params.clone(), Default::default()).unwrap();
    let mut losses = vec![l0];
    for _ in 0..10 {
        let loss = dpo_loss(&m.model);
        let grads = ropo::optim::Grads::from_store(&params, &loss.backward().unwrap()).unwrap();
        opt.step(&grads, 1e-2).unwrap();
        losses.push(dpo_loss(&m.model).to_scalar::<f64>().unwrap());
    }
    println!("qwen3 DPO losses: {losses:?}");
    assert!(losses[10] < l0 - 1e-3, "ten steps did not lower the loss: {losses:?}");
}

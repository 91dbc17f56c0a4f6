//! Parity against transformers itself for the newer architectures (Qwen3, Phi-3): tiny random
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
//!   to DIR/FAMILY for `scripts/make_arch_fixtures.py --check-merged DIR` (transformers loads it);
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

/// The fixtures' JSON arrays as f32 tensors ([`common::json_tensor`]).
fn tensor(v: &Value) -> Tensor {
    common::json_tensor(v)
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

/// Gemma 2: GeGLU, query_pre_attn_scalar, both soft caps, a window of 4 on layers 0 and 2
/// (Gemma2Config's default pattern), tied, four norms a layer stored as offsets from 1.
#[test]
fn gemma2_fixture_resolves_as_gemma2() {
    let m = load("gemma2", DType::F32);
    let c = &m.config;
    assert_eq!(c.arch, Arch::Gemma2);
    assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (64, 4, 2, 32));
    let x = &c.extras;
    assert_eq!(x.hidden_act, ropo::model::config::Activation::GeluTanh);
    assert_eq!((x.query_pre_attn_scalar, x.attn_logit_softcapping, x.final_logit_softcapping), (Some(24.0), Some(1.5), Some(5.0)));
    assert_eq!((x.sliding_window, x.sliding_layers.clone()), (Some(4), vec![true, false, true]));
    assert!(c.tie_word_embeddings && x.rope_local_theta.is_none());
    let names: Vec<String> = m.model.tensors().into_iter().map(|(n, _)| n).collect();
    for n in ["pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_layernorm"] {
        assert!(names.contains(&format!("model.layers.2.{n}.weight")), "{n}");
    }
    assert!(!names.iter().any(|n| n.contains("q_norm")));
    assert_eq!(m.tokenizer.eos_token.as_deref(), Some("<eos>"));
}

/// Gemma 3 (text): q/k norms, no caps, layer types sliding, sliding, full, two RoPE bases with
/// a linear factor on the global one (transformers 5's per-layer-type `rope_parameters`).
#[test]
fn gemma3_fixture_resolves_as_gemma3() {
    let m = load("gemma3", DType::F32);
    let c = &m.config;
    assert_eq!(c.arch, Arch::Gemma3);
    let x = &c.extras;
    assert_eq!((c.rope_theta, x.rope_local_theta, x.rope_linear_factor), (1e6, Some(1e4), Some(2.0)));
    assert_eq!((x.query_pre_attn_scalar, x.attn_logit_softcapping, x.final_logit_softcapping), (Some(20.0), None, None));
    assert_eq!((x.sliding_window, x.sliding_layers.clone()), (Some(4), vec![true, true, false]));
    assert!(m.model.layers.iter().all(|l| l.self_attn.q_norm.is_some() && l.feedforward_layernorms.is_some()));
}

#[test]
fn phi3_fixture_resolves_as_phi3() {
    let m = load("phi3", DType::F32);
    let c = &m.config;
    assert_eq!(c.arch, Arch::Phi3);
    assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size), (64, 4, 2, 16, 96));
    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e4, 1e-5));
    assert!(!c.tie_word_embeddings && !c.attention_bias);
    let shapes: Vec<(String, Vec<usize>)> = m.model.tensors().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect();
    assert!(shapes.contains(&("model.layers.0.self_attn.qkv_proj.weight".into(), vec![(4 + 2 * 2) * 16, 64])));
    assert!(shapes.contains(&("model.layers.0.mlp.gate_up_proj.weight".into(), vec![2 * 96, 64])));
    assert!(shapes.contains(&("lm_head.weight".into(), vec![272, 64])));
}

/// The right-padded batch: logits and per-token log-probs at every real position equal
/// transformers' (eager attention, float32) within 1e-4.
#[test]
fn qwen3_padded_batch_matches_transformers() {
    check_padded_batch("qwen3");
}

#[test]
fn phi3_padded_batch_matches_transformers() {
    check_padded_batch("phi3");
}

#[test]
fn gemma2_padded_batch_matches_transformers() {
    check_padded_batch("gemma2");
}

#[test]
fn gemma3_padded_batch_matches_transformers() {
    check_padded_batch("gemma3");
}

fn check_padded_batch(family: &str) {
    let e = expected(family);
    let m = load(family, DType::F32);
    let (ids, mask) = (ids_of(&e["input_ids"]), ids_of(&e["attention_mask"]));
    let lens = lengths(&e["attention_mask"]);
    let logits = m.model.forward(&ids, Some(&mask), false).unwrap();
    let want = tensor(&e["logits"]);
    let scale = max_abs(&want, &want.zeros_like().unwrap());
    let d = max_abs_real(&logits, &want, &lens);
    let lp = token_logps(&logits, &ids);
    let lens_lp: Vec<usize> = lens.iter().map(|l| l - 1).collect();
    let dl = max_abs_real(&lp, &tensor(&e["token_logps"]), &lens_lp);
    println!("{family} padded batch vs transformers: max |d logits| = {d:.3e} (max |logit| {scale:.3}), max |d log-prob| = {dl:.3e}");
    assert!(scale > 1.0, "logits too small to compare ({scale})");
    assert!(d < 1e-4, "logits differ from transformers' by {d}");
    assert!(dl < 1e-4, "token log-probs differ from transformers' by {dl}");
}

/// The bf16 fast path (`model.dtype = "bf16"`: frozen projections in bf16, f32 activations) on
/// every family: it runs (GeGLU, soft-capping, fused projections, q/k norms included) and its
/// log-probs track transformers' f32 ones.
#[test]
fn bf16_path_runs_and_tracks_f32_on_every_family() {
    for family in ["qwen3", "phi3", "gemma2", "gemma3"] {
        let e = expected(family);
        let m = load(family, DType::BF16);
        let (ids, mask) = (ids_of(&e["input_ids"]), ids_of(&e["attention_mask"]));
        let lens: Vec<usize> = lengths(&e["attention_mask"]).iter().map(|l| l - 1).collect();
        let logits = m.model.forward(&ids, Some(&mask), false).unwrap().to_dtype(DType::F32).unwrap();
        let dl = max_abs_real(&token_logps(&logits, &ids), &tensor(&e["token_logps"]), &lens);
        println!("{family} bf16 vs transformers f32: max |d log-prob| = {dl:.3e}");
        assert!(dl < 0.05, "{family}: bf16 log-probs differ from f32 by {dl}");
    }
}

/// Generation with the KV cache, each row on its own (prefill of 4, then one token at a time):
/// the logits equal transformers' batch logits at the same positions within 1e-4.
#[test]
fn qwen3_kv_cache_matches_transformers() {
    check_kv_cache("qwen3");
}

#[test]
fn phi3_kv_cache_matches_transformers() {
    check_kv_cache("phi3");
}

/// Past the window of 4, the sliding layers' cached keys are masked too.
#[test]
fn gemma2_kv_cache_matches_transformers() {
    check_kv_cache("gemma2");
}

#[test]
fn gemma3_kv_cache_matches_transformers() {
    check_kv_cache("gemma3");
}

fn check_kv_cache(family: &str) {
    let e = expected(family);
    let m = load(family, DType::F32);
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
    println!("{family} KV cache vs transformers: max |d logits| = {worst:.3e}");
}

/// Qwen3's template (thinking tags: `<think>` blocks of earlier turns dropped, the last kept)
/// renders as transformers' `apply_chat_template`, with and without the generation prompt, and
/// the rendering tokenizes to transformers' ids.
#[test]
fn qwen3_chat_template_renders_like_transformers() {
    let e = check_chat_template("qwen3");
    let cases = e["chat_template"].as_object().unwrap();
    let think = cases["assistant_with_think"]["add_generation_prompt_false"].as_str().unwrap();
    assert!(think.ends_with("<|im_start|>assistant\n<think>\nadd them\n</think>\n\n5<|im_end|>\n"), "{think:?}");
}

/// Phi-3's template (`<|user|>` ... `<|end|>`, EOS after the last turn).
#[test]
fn phi3_chat_template_renders_like_transformers() {
    let e = check_chat_template("phi3");
    let r = e["chat_template"]["with_assistant"]["add_generation_prompt_false"].as_str().unwrap();
    assert_eq!(r, "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|endoftext|>");
}

/// Gemma 2's template (`<start_of_turn>user` / `model`, `<end_of_turn>`): a system turn is refused
/// (`raise_exception`), as transformers refuses it.
#[test]
fn gemma2_chat_template_renders_like_transformers() {
    let e = check_chat_template("gemma2");
    let r = e["chat_template"]["with_assistant"]["add_generation_prompt_false"].as_str().unwrap();
    assert_eq!(r, "<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n");
    assert!(e["chat_template"]["system_user"]["raises"].is_string());
}

/// Gemma 3's template folds a system turn into the first user turn.
#[test]
fn gemma3_chat_template_renders_like_transformers() {
    let e = check_chat_template("gemma3");
    let r = e["chat_template"]["system_user"]["add_generation_prompt_true"].as_str().unwrap();
    assert_eq!(r, "<bos><start_of_turn>user\nYou are terse.\n\nName a prime.<end_of_turn>\n<start_of_turn>model\n");
}

/// Every rendering of the family's expected.json equals ours, and tokenizes to the same ids.
fn check_chat_template(family: &str) -> Value {
    let e = expected(family);
    let m = load(family, DType::F32);
    let t = &m.tokenizer;
    let src = t.chat_template.as_deref().expect("chat_template.jinja is read");
    let tmpl = ChatTemplate::new(src, t.bos_token.as_deref(), t.eos_token.as_deref()).unwrap();
    let cases = e["chat_template"].as_object().unwrap();
    assert!(cases.len() >= 5);
    for (name, case) in cases {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        if let Some(why) = case["raises"].as_str() {
            // the template refuses it (Gemma 2: no system turn); so does ours, with its message
            let err = tmpl.render(&msgs, false).unwrap_err().to_string();
            assert!(err.contains(why), "{name}: {err:?} does not carry the template's {why:?}");
            continue;
        }
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
    e
}

/// The data rule on Qwen3's template: a conversational pair tokenizes to TRL's ids (prompt with
/// the generation prompt; completion = the final assistant turn as the template writes it, the
/// empty `<think>\n\n</think>\n\n` block Qwen3 puts before a non-thinking answer included,
/// then `<|im_end|>\n`), and the pair keeps the rule (no violation).
#[test]
fn qwen3_pair_tokenizes_as_trl() {
    let (t, p, _) = tokenize_pair("qwen3");
    assert_eq!(t.chosen_ids, ids(&p["chosen_ids"]), "chosen: {:?}", p["chosen_text"]);
    assert_eq!(t.rejected_ids, ids(&p["rejected_ids"]));
    assert_eq!(p["chosen_text"].as_str(), Some("<think>\n\n</think>\n\nParis.<|im_end|>\n"));
}

/// Phi-3's template writes `<|end|>\n` and then EOS after the last turn; TRL keeps both, ropo's
/// data rule keeps the first end-of-turn (README "The data rule"): the completion is TRL's
/// without the final `<|endoftext|>`.
#[test]
fn phi3_pair_tokenizes_as_trl_up_to_the_final_eos() {
    let (t, p, text) = tokenize_pair("phi3");
    assert_eq!(p["chosen_text"].as_str(), Some("Paris.<|end|>\n<|endoftext|>"));
    for (side, got) in [("chosen", &t.chosen_ids), ("rejected", &t.rejected_ids)] {
        let trl = ids(&p[format!("{side}_ids")]);
        assert_eq!(got[..], trl[..trl.len() - 1], "{side}: ropo {:?}", text(got));
    }
}

/// Gemma: the completion is the final model turn and its `<end_of_turn>\n`, TRL's ids exactly.
#[test]
fn gemma2_pair_tokenizes_as_trl() {
    let (t, p, _) = tokenize_pair("gemma2");
    assert_eq!(p["chosen_text"].as_str(), Some("Paris.<end_of_turn>\n"));
    assert_eq!((t.chosen_ids.clone(), t.rejected_ids.clone()), (ids(&p["chosen_ids"]), ids(&p["rejected_ids"])));
}

#[test]
fn gemma3_pair_tokenizes_as_trl() {
    let (t, p, _) = tokenize_pair("gemma3");
    assert_eq!(p["chosen_text"].as_str(), Some("Paris.<end_of_turn>\n"));
    assert_eq!((t.chosen_ids.clone(), t.rejected_ids.clone()), (ids(&p["chosen_ids"]), ids(&p["rejected_ids"])));
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The fixture's pair through ropo's [`PairTokenizer`]: kept, its prompt ids TRL's, no
/// violation of the data rule. Returns the pair, expected.json's `dpo_pair` and a decoder.
fn tokenize_pair(family: &str) -> (ropo::data::tokenize::TokenizedPair, Value, impl Fn(&[u32]) -> String) {
    use ropo::data::tokenize::{PairTokenizer, TokenizeOptions};
    use ropo::data::{DataReport, Pair, PreferenceExample};
    let p = expected(family)["dpo_pair"].clone();
    let m = load(family, DType::F32);
    let pt = PairTokenizer::new(&m.tokenizer, None, TokenizeOptions { max_length: None, max_prompt_length: None }).unwrap();
    let msgs = |k: &str| -> Vec<Message> { serde_json::from_value(p["pair"][k].clone()).unwrap() };
    let ex = PreferenceExample { line: 1, pair: Pair::Chat { prompt: msgs("prompt"), chosen: msgs("chosen"), rejected: msgs("rejected") } };
    let mut report = DataReport::default();
    let t = pt.tokenize(&ex, std::path::Path::new("pair.jsonl"), &mut report).unwrap().expect("the pair is kept");
    assert_eq!(t.prompt_ids, ids(&p["prompt_ids"]), "{family}: prompt ids");
    assert_eq!(pt.violation(&t), None, "{family}");
    let inner = m.tokenizer.inner.clone();
    (t, p, move |x: &[u32]| inner.decode(x, false).unwrap())
}

/// Every projection of a layer, by the names the family's checkpoint uses.
fn projections(family: &str) -> &'static [&'static str] {
    match family {
        "phi3" => &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        _ => &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
}

fn section(kind: AdapterKind, targets: &[&str]) -> AdapterSection {
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
/// the fixture batch as expected_logits.json, in `$ROPO_ARCH_MERGED_OUT/FAMILY` (for
/// `make_arch_fixtures.py --check-merged`).
fn keep_merged(family: &str, out: &std::path::Path, adapted: &Tensor) {
    let Ok(dir) = std::env::var("ROPO_ARCH_MERGED_OUT") else { return };
    let dir = PathBuf::from(dir).join(family);
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
    for (i, m) in check_merge_round_trip("qwen3").iter().enumerate() {
        let norms = |m: &LoadedModel| m.model.layers[1].self_attn.k_norm.clone().unwrap();
        assert_eq!(max_abs(&norms(&load("qwen3", DType::F32)), &norms(m)), 0.0, "k_norm written back ({i})");
    }
}

/// Phi-3: the adapters sit on the fused `qkv_proj` and `gate_up_proj` (named as the checkpoint
/// names them), and the merged folder stores them fused.
#[test]
fn phi3_adapters_merge_round_trip_fused() {
    for m in check_merge_round_trip("phi3") {
        let names: Vec<String> = m.model.tensors().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.layers.0.self_attn.qkv_proj.weight".to_string()) && names.contains(&"model.layers.1.mlp.gate_up_proj.weight".to_string()));
        assert!(!names.iter().any(|n| n.contains("q_proj") || n.contains("gate_proj.")), "{names:?}");
        assert_eq!(m.model.linears().len(), 2 * 4 + 1);
    }
}

/// Gemma 2 and 3: the merged folders keep the norms (offsets from 1, written as stored), the
/// caps, the window and the layer types; transformers' config keys are checked in
/// [`check_merge_round_trip`] and `make_arch_fixtures.py --check-merged`.
#[test]
fn gemma2_adapters_merge_round_trip() {
    for m in check_merge_round_trip("gemma2") {
        assert_eq!(m.config.extras, load("gemma2", DType::F32).config.extras);
        let post = |m: &LoadedModel| m.model.layers[2].feedforward_layernorms.clone().unwrap().1;
        assert_eq!(max_abs(&post(&load("gemma2", DType::F32)), &post(&m)), 0.0, "post_feedforward_layernorm written back");
    }
}

#[test]
fn gemma3_adapters_merge_round_trip() {
    for m in check_merge_round_trip("gemma3") {
        assert_eq!(m.config.extras, load("gemma3", DType::F32).config.extras);
    }
}

/// For RoPO, LoRA and full: inject on every projection, check the identity at init, perturb,
/// save, `ropo merge` to an HF folder, check its config.json and that it loads back with the
/// adapted logits. Returns the three merged models.
fn check_merge_round_trip(family: &str) -> Vec<LoadedModel> {
    let e = expected(family);
    let (ids, mask) = (ids_of(&e["input_ids"]), ids_of(&e["attention_mask"]));
    let lens = lengths(&e["attention_mask"]);
    let source = fixture(family);
    let src_cfg: Value = serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut out_models = vec![];
    for (i, kind) in [AdapterKind::Ropo, AdapterKind::Lora, AdapterKind::Full].into_iter().enumerate() {
        let mut m = load(family, DType::F32);
        let base = m.model.forward(&ids, Some(&mask), false).unwrap();
        let set = AnyAdapterSet::inject(&mut m.model, &section(kind, projections(family)), source.to_str().unwrap()).unwrap();
        assert!(set.vars().iter().all(|(n, _)| !n.contains("norm")), "norms stay frozen");
        let init = max_abs_real(&m.model.forward(&ids, Some(&mask), true).unwrap(), &base, &lens);
        assert!(init < 1e-5, "{kind:?}: a fresh adapter moves the logits by {init}");
        perturb(&set, 10 + i as u64);
        let adapted = m.model.forward(&ids, Some(&mask), true).unwrap();
        let adapter_dir = tmp.path().join(format!("adapter_{i}"));
        set.save(&adapter_dir).unwrap();
        let out = tmp.path().join(format!("merged_{i}"));
        let n_merged = merge::merge_to_folder(source.to_str().unwrap(), &Default::default(), &adapter_dir, &out, DType::F32, false).unwrap();
        assert_eq!(n_merged, m.config.num_hidden_layers * projections(family).len());
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        for key in ["model_type", "architectures", "hidden_size", "num_key_value_heads", "tie_word_embeddings", "vocab_size", "rms_norm_eps"] {
            assert_eq!(cfg[key], src_cfg[key], "{family}: config.json {key}");
        }
        if family.starts_with("gemma") {
            for key in ["hidden_activation", "sliding_window", "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"] {
                assert_eq!(cfg[key], src_cfg[key], "{family}: config.json {key}");
            }
        }
        let head_dim = src_cfg["head_dim"].as_u64().unwrap_or(src_cfg["hidden_size"].as_u64().unwrap() / src_cfg["num_attention_heads"].as_u64().unwrap());
        assert_eq!(cfg["head_dim"].as_u64(), Some(head_dim));
        let merged = ropo::model::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert_eq!(merged.config, m.config);
        let logits = merged.model.forward(&ids, Some(&mask), false).unwrap();
        let d = max_abs_real(&logits, &adapted, &lens);
        let moved = max_abs_real(&adapted, &base, &lens);
        println!("{family} {kind:?}: max |merged - adapted| = {d:.3e}, max |adapted - base| = {moved:.3e}");
        assert!(d < 1e-4, "{kind:?}: merged logits differ from the adapter's by {d}");
        assert!(moved > 1e-2, "{kind:?}: the adapter does not change the logits ({moved})");
        if kind == AdapterKind::Ropo {
            keep_merged(family, &out, &adapted);
        }
        out_models.push(merged);
    }
    out_models
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
    check_ln2_then_lower("qwen3", &AdapterSection::default(), 2 * 4 * 3);
}

/// Phi-3 with RoPO on its fused `qkv_proj` and `o_proj`.
#[test]
fn phi3_identity_at_init_loss_ln2_and_steps_lower_it() {
    check_ln2_then_lower("phi3", &AdapterSection { target_modules: vec!["qkv_proj".into(), "o_proj".into()], ..Default::default() }, 2 * 2 * 3);
}

/// Gemma 2 with RoPO on q, k, v, o: the soft-capped attention and logits in the graph.
#[test]
fn gemma2_identity_at_init_loss_ln2_and_steps_lower_it() {
    check_ln2_then_lower("gemma2", &AdapterSection::default(), 3 * 4 * 3);
}

/// Gemma 3 with RoPO on the GeGLU MLP's projections too.
#[test]
fn gemma3_identity_at_init_loss_ln2_and_steps_lower_it() {
    let all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    check_ln2_then_lower("gemma3", &AdapterSection { target_modules: all.iter().map(|s| s.to_string()).collect(), ..Default::default() }, 3 * 7 * 3);
}

/// `adapter` (with `n_params` trainable tensors) on the family's fixture in f64: DPO loss ln 2
/// at init, lower after ten AdamW steps.
fn check_ln2_then_lower(family: &str, adapter: &AdapterSection, n_params: usize) {
    let mut m = load(family, DType::F64);
    let set = AnyAdapterSet::inject(&mut m.model, adapter, family).unwrap();
    let params = set.vars();
    assert_eq!(params.len(), n_params, "u, theta, m per adapted linear");
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
    println!("{family} DPO losses: {losses:?}");
    assert!(losses[10] < l0 - 1e-3, "ten steps did not lower the loss: {losses:?}");
}

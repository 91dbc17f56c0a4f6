//! Loaders: GGUF -> HF folder export round trip, hub ids from a pre-populated offline cache,
//! and bad inputs (each error names the file and the problem; nothing panics).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use ropo::model::config::{Arch, ModelConfig};
use ropo::model::{export, gguf, hf_folder, load_parts, LoadOptions, ModelParts};

/// A tiny Llama config over the SmolLM2 vocabulary (49152 ids) so the real tokenizer fits.
fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 49152,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        extras: Default::default(),
    }
}

/// Seeded random tensors with HF names for `cfg` (ChaCha8, uniform in [-0.5, 0.5)).
fn random_tensors(cfg: &ModelConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), t(&[v, d]));
    m.insert("model.norm.weight".to_string(), t(&[d]));
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), t(&[v, d]));
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
            ("self_attn.q_proj.weight", vec![q, d]),
            ("self_attn.k_proj.weight", vec![kv, d]),
            ("self_attn.v_proj.weight", vec![kv, d]),
            ("self_attn.o_proj.weight", vec![d, q]),
            ("mlp.gate_proj.weight", vec![f, d]),
            ("mlp.up_proj.weight", vec![f, d]),
            ("mlp.down_proj.weight", vec![d, f]),
        ] {
            m.insert(format!("{p}.{name}"), t(&shape));
        }
    }
    m
}

fn smollm2() -> ModelParts {
    gguf::load(&common::smollm2_gguf(), &Device::Cpu).unwrap()
}

/// Write a tiny random model with the SmolLM2 tokenizer as an HF folder at `dir`.
fn write_tiny(dir: &Path, tokenizer: &ropo::model::tokenizer::Tokenizer) -> (ModelConfig, BTreeMap<String, Tensor>) {
    let cfg = tiny_config();
    let tensors = random_tensors(&cfg, 7);
    export::write_hf_folder(dir, &cfg, &tensors, tokenizer, DType::F32).unwrap();
    (cfg, tensors)
}

fn assert_same_tensors(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in a {
        let y = &b[k];
        assert_eq!(x.dims(), y.dims(), "{k}");
        let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k} differs by {d}");
    }
}

fn golden_texts() -> Vec<String> {
    let g = common::golden("smollm2_golden.json");
    let mut v: Vec<String> = g["tokenization"].as_object().unwrap().values().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    v.push(g["chat_template"]["rendered_with_assistant"].as_str().unwrap().to_string());
    v
}

fn ids(t: &ropo::model::tokenizer::Tokenizer, text: &str) -> Vec<u32> {
    t.inner.encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn gguf_exports_to_an_hf_folder_that_loads_back_identically() {
    let src = smollm2();
    assert_eq!(src.tensors.len(), 2 + 30 * 9, "embed + norm + 30 layers x 9 (tied: no lm_head)");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-hf");
    export::write_hf_folder(&out, &src.config, &src.tensors, &src.tokenizer, DType::F32).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    // nothing else left next to the folder (the staging folder is gone)
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    let back = hf_folder::load(&out, &Device::Cpu).unwrap();
    assert_eq!(back.config, src.config);
    assert_same_tensors(&src.tensors, &back.tensors);
    assert_eq!(back.tokenizer.chat_template, src.tokenizer.chat_template);
    assert_eq!(back.tokenizer.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(back.tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(back.tokenizer.eos_token_ids, vec![2]);
    for text in golden_texts() {
        assert_eq!(ids(&back.tokenizer, &text), ids(&src.tokenizer, &text), "{text}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["tie_word_embeddings"], true);
}

#[test]
fn export_in_bf16_and_f16_stores_that_dtype() {
    let tok = smollm2().tokenizer;
    let cfg = tiny_config();
    let tensors = random_tensors(&cfg, 3);
    for (dtype, name) in [(DType::BF16, "bfloat16"), (DType::F16, "float16")] {
        let tmp = tempfile::tempdir().unwrap();
        export::write_hf_folder(tmp.path(), &cfg, &tensors, &tok, dtype).unwrap();
        let back = hf_folder::load(tmp.path(), &Device::Cpu).unwrap();
        let w = &back.tensors["model.layers.1.mlp.up_proj.weight"];
        assert_eq!(w.dtype(), dtype);
        let diff = (w.to_dtype(DType::F32).unwrap() - &tensors["model.layers.1.mlp.up_proj.weight"]).unwrap().abs().unwrap();
        let max = diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max > 0.0 && max < 4e-3, "{name}: rounding error {max}");
        let cj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cj["torch_dtype"], name);
    }
    let e = export::write_hf_folder(&PathBuf::from("/tmp/never"), &cfg, &tensors, &tok, DType::U32).unwrap_err();
    assert!(e.to_string().contains("f32, bf16 or f16"), "{e}");
}

/// Hub ids from a pre-populated cache laid out like HF's (`models--org--name/snapshots/REV/...`,
/// `refs/main`), offline. The environment route (HF_HOME, HF_HUB_OFFLINE) is tested through the
/// binary in `hub_id_loads_a_runnable_model`, so no test here changes the process environment.
#[test]
fn hub_id_loads_from_an_offline_cache() {
    use ropo::model::hub::{snapshot_with, HubSettings};
    let tok = smollm2().tokenizer;
    let home = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--ropo-test--tiny-llama");
    let (cfg, tensors) = write_tiny(&repo.join("snapshots").join(rev), &tok);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let settings = HubSettings { cache_dir: home.path().join("hub"), offline: true };

    let dir = snapshot_with("ropo-test/tiny-llama", None, &settings).unwrap();
    assert_eq!(dir, repo.join("snapshots").join(rev));
    let parts = hf_folder::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(parts.config, cfg);
    assert_same_tensors(&tensors, &parts.tensors);
    assert_eq!(ids(&parts.tokenizer, "In 2024 the price rose"), ids(&tok, "In 2024 the price rose"));

    // by explicit commit
    assert_eq!(snapshot_with("ropo-test/tiny-llama", Some(rev), &settings).unwrap(), dir);

    // an unknown branch and an unknown repo: clear errors, no network
    let e = snapshot_with("ropo-test/tiny-llama", Some("nope"), &settings).unwrap_err().to_string();
    assert!(e.contains("ropo-test/tiny-llama@nope") && e.contains("config.json not found") && e.contains("HF_HUB_OFFLINE"), "{e}");
    let e = snapshot_with("ropo-test/absent", None, &settings).unwrap_err().to_string();
    assert!(e.contains("ropo-test/absent@main") && e.contains("not found"), "{e}");
}

#[test]
fn missing_paths_are_named() {
    for src in ["/nonexistent/dir/model.gguf", "./no-such-folder", "/no/such/model"] {
        let e = load_parts(src, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains(src) && e.contains("no such file or directory"), "{e}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let e = load_parts(tmp.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("cannot read"), "{e}");
    let f = tmp.path().join("weights.bin");
    std::fs::write(&f, b"x").unwrap();
    let e = load_parts(f.to_str().unwrap(), &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("weights.bin") && e.contains("not a .gguf"), "{e}");
}

#[test]
fn missing_weights_and_tokenizer_are_named() {
    let tok = smollm2().tokenizer;
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), &tok);
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = hf_folder::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("missing"), "{e}");
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let e = hf_folder::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json: missing"), "{e}");
}

#[test]
fn truncated_safetensors_is_named() {
    let tok = smollm2().tokenizer;
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), &tok);
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for keep in [bytes.len() / 2, 20, 4] {
        std::fs::write(&st, &bytes[..keep]).unwrap();
        let e = hf_folder::load(tmp.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains(st.to_str().unwrap()) && e.contains("truncated or corrupt safetensors"), "{e}");
    }
}

#[test]
fn truncated_gguf_is_named() {
    let bytes = std::fs::read(common::smollm2_gguf()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("cut.gguf");
    // inside the tensor data, inside the metadata, inside the magic
    for keep in [bytes.len() - 1000, 300_000, 1000, 3] {
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let e = load_parts(p.to_str().unwrap(), &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains(p.to_str().unwrap()) && e.contains("truncated or corrupt"), "{keep}: {e}");
    }
}

#[test]
fn gpt_neox_config_is_rejected() {
    let tok = smollm2().tokenizer;
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), &tok);
    let p = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "gpt_neox".into();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_parts(tmp.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains(p.to_str().unwrap()) && e.contains("unsupported model_type \"gpt_neox\""), "{e}");
}

#[test]
fn tokenizer_larger_than_vocab_is_an_error_smaller_is_fine() {
    let tok = smollm2().tokenizer;
    let tmp = tempfile::tempdir().unwrap();
    write_tiny(tmp.path(), &tok);
    let p = tmp.path().join("config.json");
    let orig = std::fs::read_to_string(&p).unwrap();
    let with_vocab = |n: usize| {
        let mut cfg: serde_json::Value = serde_json::from_str(&orig).unwrap();
        cfg["vocab_size"] = n.into();
        std::fs::write(&p, cfg.to_string()).unwrap();
    };
    with_vocab(32000);
    let e = load_parts(tmp.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("token ids up to 49151") && e.contains("vocab_size is 32000"),
        "{e}"
    );
    // a padded embedding (vocab_size > tokenizer) is what HF does; it loads
    with_vocab(49216);
    assert_eq!(load_parts(tmp.path().to_str().unwrap(), &LoadOptions::default()).unwrap().config.vocab_size, 49216);
}

/// GGUF -> `LoadedModel::export` (f32) -> HF-folder loader: the same logits (1e-5; in fact the
/// weights are bit-identical, so only thread scheduling could differ) and the same tokenizer ids.
#[test]
fn export_round_trip_gives_the_same_logits() {
    let gguf = common::smollm2_gguf();
    let a = ropo::model::load(gguf.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    a.export(&dir, DType::F32).unwrap();
    let b = ropo::model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(a.config, b.config);
    let g = common::golden("smollm2_golden.json");
    let text = g["chat_template"]["rendered_with_assistant"].as_str().unwrap();
    let ids_a = ids(&a.tokenizer, text);
    assert_eq!(ids_a, ids(&b.tokenizer, text));
    let input = Tensor::new(ids_a.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let la = a.model.forward(&input, None, false).unwrap();
    let lb = b.model.forward(&input, None, false).unwrap();
    let d = (la - lb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d <= 1e-5, "max |logit difference| {d}");
}

/// A hub id loads all the way to a runnable model (tiny random weights, offline cache).
#[test]
fn hub_id_loads_a_runnable_model() {
    let tok = smollm2().tokenizer;
    let home = tempfile::tempdir().unwrap();
    let rev = "fedcba9876543210fedcba9876543210fedcba98";
    let repo = home.path().join("hub/models--ropo-test--tiny-run");
    let (cfg, _) = write_tiny(&repo.join("snapshots").join(rev), &tok);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    // the binary, with its own environment: no process-wide set_var here
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ropo"))
        .args(["generate", "--model", "ropo-test/tiny-run", "--prompt", "Hello", "--max-new-tokens", "3"])
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // the same as generating in-process from the snapshot folder itself
    let lm = ropo::model::load(repo.join("snapshots").join(rev).to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(lm.config, cfg);
    let prompt = ids(&lm.tokenizer, "Hello");
    let opts = ropo::generate::GenerateOptions { max_new_tokens: 3, ..Default::default() };
    let g = ropo::generate::generate(&lm.model, &lm.tokenizer, &prompt, &opts, true).unwrap();
    assert!(!g.ids.is_empty());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{}\n", g.text));
}

/// A GGUF written the way llama.cpp's converter writes one (llama.cpp names, q/k rows permuted
/// for `llama`, not for `qwen2` / `qwen3`; f32 tensors; the SmolLM2 tokenizer metadata) loads
/// back to the original HF tensors: checks the name map, the un-permutation, untied
/// `output.weight`, Qwen2's q/k/v biases and Qwen3's `attn_q_norm` / `attn_k_norm` with a
/// `key_length` (head_dim 6) other than width / heads end to end.
#[test]
fn synthetic_gguf_loads_back_to_the_hf_tensors() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};

    let real = std::fs::read(common::smollm2_gguf()).unwrap();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&real[..])).unwrap();
    let mut tok_meta: Vec<(String, Value)> =
        content.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    tok_meta.sort_by(|a, b| a.0.cmp(&b.0));
    let reference = smollm2().tokenizer;
    let smollm2_tokenizer_ref = || reference.clone();

    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let mut cfg = tiny_config();
        cfg.arch = arch;
        if arch == Arch::Qwen3 {
            cfg.head_dim = 6;
        }
        cfg.attention_bias = arch == Arch::Qwen2;
        cfg.rms_norm_eps = 1e-6;
        cfg.rope_theta = 500000.0;
        cfg.max_position_embeddings = 128;
        let mut hf = random_tensors(&cfg, 11);
        if arch == Arch::Qwen3 {
            for i in 0..cfg.num_hidden_layers {
                for (n, c) in [("q_norm", 1.5f32), ("k_norm", 0.5)] {
                    hf.insert(format!("model.layers.{i}.self_attn.{n}.weight"), Tensor::new(&[c, 1.0, 0.9, 1.1, 1.2, 0.8], &Device::Cpu).unwrap());
                }
            }
        }
        if cfg.attention_bias {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            for i in 0..cfg.num_hidden_layers {
                for (p, n) in [("q", 8), ("k", 4), ("v", 4)] {
                    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
                    hf.insert(format!("model.layers.{i}.self_attn.{p}_proj.bias"), Tensor::new(v, &Device::Cpu).unwrap());
                }
            }
        }
        // HF -> llama.cpp names, permuting q/k rows as convert_hf_to_gguf.py does for llama
        let mut qts: Vec<(String, QTensor)> = Vec::new();
        for (name, t) in &hf {
            let g = name
                .replace("model.embed_tokens.weight", "token_embd.weight")
                .replace("model.norm.weight", "output_norm.weight")
                .replace("lm_head.weight", "output.weight")
                .replace("model.layers.", "blk.")
                .replace("self_attn.q_proj", "attn_q")
                .replace("self_attn.k_proj", "attn_k")
                .replace("self_attn.v_proj", "attn_v")
                .replace("self_attn.o_proj", "attn_output")
                .replace("self_attn.q_norm", "attn_q_norm")
                .replace("self_attn.k_norm", "attn_k_norm")
                .replace("mlp.gate_proj", "ffn_gate")
                .replace("mlp.up_proj", "ffn_up")
                .replace("mlp.down_proj", "ffn_down")
                .replace("post_attention_layernorm", "ffn_norm")
                .replace("input_layernorm", "attn_norm");
            let t = match (arch, name.contains("q_proj.weight"), name.contains("k_proj.weight")) {
                (Arch::Llama, true, _) => gguf::permute(t, cfg.num_attention_heads).unwrap(),
                (Arch::Llama, _, true) => gguf::permute(t, cfg.num_key_value_heads).unwrap(),
                _ => t.clone(),
            };
            qts.push((g, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        }
        let a = match arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            _ => "qwen3",
        };
        let k = |s: &str| format!("{a}.{s}");
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(a.into())),
            (k("block_count"), Value::U32(2)),
            (k("context_length"), Value::U32(128)),
            (k("embedding_length"), Value::U32(8)),
            (k("feed_forward_length"), Value::U32(12)),
            (k("attention.head_count"), Value::U32(2)),
            (k("attention.head_count_kv"), Value::U32(1)),
            (k("attention.key_length"), Value::U32(cfg.head_dim as u32)),
            (k("rope.freq_base"), Value::F32(500000.0)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        ];
        meta.extend(tok_meta.iter().cloned());
        // llama.cpp's add_bos_token: on for the qwen2 case (SmolLM2's own metadata has it off)
        let add_bos = arch == Arch::Qwen2;
        for (key, v) in meta.iter_mut() {
            if key == "tokenizer.ggml.add_bos_token" {
                *v = Value::Bool(add_bos);
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("tiny.gguf");
        let mut f = std::fs::File::create(&p).unwrap();
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let qt_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &meta_refs, &qt_refs).unwrap();
        drop(f);

        let parts = gguf::load(&p, &Device::Cpu).unwrap();
        // vocab_size comes from the token list when {arch}.vocab_size is absent
        assert_eq!(parts.config, cfg, "{a}");
        assert_same_tensors(&hf, &parts.tensors);
        let enc = |special: bool| parts.tokenizer.inner.encode("Hi there", special).unwrap().get_ids().to_vec();
        let plain = enc(false);
        assert_eq!(plain, ids(&smollm2_tokenizer_ref(), "Hi there"));
        let with_bos = if add_bos { [vec![1], plain.clone()].concat() } else { plain.clone() };
        assert_eq!(enc(true), with_bos, "{a}: add_bos_token = {add_bos}");
        // and the model built from it runs
        let m = ropo::model::llama::Model::load(parts.var_builder(DType::F32, &Device::Cpu), &parts.config).unwrap();
        let x = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x, None, false).unwrap().dims(), [1, 3, 49152]);
    }
}

/// An `HF_TOKEN` never appears in an error: a hub lookup that fails (offline, so no network),
/// and an error that echoes the token itself (a model id holding it) print `<HF_TOKEN>`.
#[test]
fn hf_token_never_appears_in_errors() {
    let token = "hf_fuzzSecretToken0123456789";
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("d.jsonl");
    std::fs::write(&data, "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n").unwrap();
    for model in ["nobody-here/no-such-model".to_string(), format!("{token}/x")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ropo"))
            .args(["data", "inspect", data.to_str().unwrap(), "--model", &model])
            .env("HF_TOKEN", token)
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!stderr.contains(token) && !stdout.contains(token), "{model}: {stderr}");
        assert!(stderr.starts_with("ropo: "), "{stderr}");
    }
}

/// A GGUF file written by hand: `kvs` as (key, value type, value bytes), `tensors` as (name,
/// dims, ggml dtype, offset); no tensor data unless `data` is given.
fn raw_gguf(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
    let s = |out: &mut Vec<u8>, t: &str| {
        out.extend((t.len() as u64).to_le_bytes());
        out.extend(t.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, ty, v) in kvs {
        s(&mut out, k);
        out.extend(ty.to_le_bytes());
        out.extend(v);
    }
    for (name, dims, dtype, offset) in tensors {
        s(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(dtype.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    out.extend(data);
    out
}

fn gguf_string(v: &str) -> Vec<u8> {
    [(v.len() as u64).to_le_bytes().to_vec(), v.as_bytes().to_vec()].concat()
}

/// `general.alignment = 0` made candle's reader divide by zero (a panic; found reading it for
/// the GGUF fuzz target, fuzz/fuzz_targets/gguf.rs); it is refused with the file named.
#[test]
fn gguf_alignment_zero_is_refused_not_a_panic() {
    let arch = ("general.architecture", 8, gguf_string("llama"));
    for (ty, value) in [(4u32, 0u32.to_le_bytes().to_vec()), (0, vec![0u8]), (5, 0i32.to_le_bytes().to_vec())] {
        let bytes = raw_gguf(&[arch.clone(), ("general.alignment", ty, value)], &[], &[]);
        let e = gguf::load_bytes(&bytes, Path::new("a.gguf"), &Device::Cpu).map(|p| p.tensors.len()).unwrap_err().to_string();
        assert_eq!(e, "a.gguf: not a valid GGUF file: general.alignment is 0");
    }
    // a positive alignment reads on (and fails later, on the missing metadata, with the file)
    let bytes = raw_gguf(&[arch, ("general.alignment", 4, 64u32.to_le_bytes().to_vec())], &[], &[]);
    let e = gguf::load_bytes(&bytes, Path::new("a.gguf"), &Device::Cpu).map(|p| p.tensors.len()).unwrap_err().to_string();
    assert!(e.starts_with("a.gguf: ") && !e.contains("alignment"), "{e}");
}

/// Absurd tensor sizes (dimensions whose product overflows, or bytes past the end of the file)
/// are refused before anything is allocated for them.
#[test]
fn gguf_absurd_tensor_sizes_are_refused_before_allocating() {
    let arch = ("general.architecture", 8, gguf_string("llama"));
    let cases: [(&[u64], u64, &str); 3] = [
        (&[1 << 40, 1 << 40], 0, "token_embd.weight: dimensions [1099511627776, 1099511627776] overflow"),
        (&[1 << 30, 1 << 20], 0, "lies past the end of the file"),
        (&[4], u64::MAX - 8, "lies past the end of the file"),
    ];
    for (dims, offset, want) in cases {
        let bytes = raw_gguf(&[arch.clone()], &[("token_embd.weight", dims, 0, offset)], &[0u8; 16]);
        let e = gguf::load_bytes(&bytes, Path::new("t.gguf"), &Device::Cpu).map(|p| p.tensors.len()).unwrap_err().to_string();
        assert!(e.starts_with("t.gguf: not a valid GGUF file (truncated or corrupt): tensor ") && e.contains(want), "{e}");
    }
}

/// A 1-layer llama GGUF (hidden 8, 2 heads, 1 KV head, a 40-token byte-level BPE tokenizer)
/// with `head_count` as its `llama.attention.head_count`: the base file of the gguf fuzz target.
fn tiny_llama_gguf(head_count: u32) -> Vec<u8> {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        QTensor::quantize(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
    };
    let (v, h, f) = (40usize, 8usize, 12usize);
    let tensors: Vec<(&str, QTensor)> = vec![
        ("token_embd.weight", t(&[v, h])),
        ("output_norm.weight", t(&[h])),
        ("blk.0.attn_norm.weight", t(&[h])),
        ("blk.0.ffn_norm.weight", t(&[h])),
        ("blk.0.attn_q.weight", t(&[h, h])),
        ("blk.0.attn_k.weight", t(&[4, h])),
        ("blk.0.attn_v.weight", t(&[4, h])),
        ("blk.0.attn_output.weight", t(&[h, h])),
        ("blk.0.ffn_gate.weight", t(&[f, h])),
        ("blk.0.ffn_up.weight", t(&[f, h])),
        ("blk.0.ffn_down.weight", t(&[h, f])),
    ];
    let mut tokens: Vec<Value> = (b'a'..=b'z').map(|c| Value::String((c as char).to_string())).collect();
    tokens.extend(["Ġ", "Ċ", "ab", "ba", "<|im_start|>", "<|im_end|>", "<|endoftext|>"].map(|s| Value::String(s.into())));
    while tokens.len() < v {
        tokens.push(Value::String(format!("x{}", tokens.len())));
    }
    let types: Vec<Value> = (0..v).map(|i| Value::I32(if (30..33).contains(&i) { 3 } else { 1 })).collect();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(h as u32)),
        ("llama.feed_forward_length", Value::U32(f as u32)),
        ("llama.attention.head_count", Value::U32(head_count)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(30)),
        ("tokenizer.ggml.eos_token_id", Value::U32(31)),
    ];
    let mut out = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut out, &meta_refs, &t_refs).unwrap();
    out.into_inner()
}

/// Fuzz finding (gguf target, crash-02e884a9a64644d7355975dad33867c2b08b4613: a patched
/// `llama.attention.head_count` of 35329): the error of a head count that does not divide the
/// q/k rows did not name the file. It names the file, the tensor and the key now.
#[test]
fn fuzz_gguf_head_count_not_dividing_q_rows_names_the_file() {
    assert_eq!(gguf::load_bytes(&tiny_llama_gguf(2), Path::new("t.gguf"), &Device::Cpu).unwrap().tensors.len(), 11);
    let e = gguf::load_bytes(&tiny_llama_gguf(3), Path::new("t.gguf"), &Device::Cpu).map(|p| p.tensors.len()).unwrap_err().to_string();
    assert_eq!(e, "t.gguf: tensor blk.0.attn_q.weight: cannot un-permute a (8, 8) weight over 3 heads (llama.attention.head_count)");
}

/// Fuzz finding (gguf target, crash-db577307c3ccbecd7ff60a72698973210acbfdea: a patched
/// dimension of 0): candle read the empty tensor through a dangling, misaligned pointer
/// (`slice::from_raw_parts`' precondition, undefined behaviour; a panic with debug assertions).
/// A tensor with no elements is refused before it is read.
#[test]
fn fuzz_gguf_tensor_with_a_zero_dimension_is_refused() {
    let arch = ("general.architecture", 8, gguf_string("llama"));
    for dtype in [0u32, 1, 2] {
        // F32, F16, Q4_0
        let bytes = raw_gguf(&[arch.clone()], &[("token_embd.weight", &[0, 8], dtype, 0)], &[0u8; 64]);
        let e = gguf::load_bytes(&bytes, Path::new("t.gguf"), &Device::Cpu).map(|p| p.tensors.len()).unwrap_err().to_string();
        assert_eq!(e, "t.gguf: not a valid GGUF file (truncated or corrupt): tensor token_embd.weight: dimensions [8, 0] hold no elements"); // candle reverses ggml's dimension order
    }
}

//! GGUF files of the Gemma 2, Gemma 3 and Phi-3 architectures (llama.cpp's `gemma2`, `gemma3`,
//! `phi3`) read by ropo against the HF folders they were converted from and against
//! transformers (tests/fixtures/gguf/<family>/, made by scripts/make_gguf_fixtures.py with the
//! anchor venv: tiny random models, converted by llama.cpp's own `convert_hf_to_gguf.py
//! --outtype f32`, SentencePiece BPE tokenizers with byte fallback):
//!
//! - the config equals the HF folder's resolved config.json, `ArchExtras` included;
//! - every tensor equals the HF safetensors (Gemma's norms after undoing the converter's `1 + w`,
//!   to f32 rounding);
//! - the logits of a right-padded batch equal transformers' (eager, f32) on the HF folder within
//!   1e-4 at every real position;
//! - the tokenizer built from `tokenizer.ggml.*` has transformers' vocab and merges (its GGUF
//!   tokenizer loader, `AutoTokenizer.from_pretrained(gguf_file=...)`) and gives its ids on
//!   strings with spaces, digits, byte-fallback unicode, special tokens;
//! - edited copies: an unknown architecture or tokenizer kind, and a Phi-3 128k
//!   (`rope_factors_long`) file, are refused naming the file; a `sliding_window_pattern` key
//!   overrides llama.cpp's hard-coded Gemma pattern.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value as GValue};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::tiny::max_abs;
use ropo::model::config::Arch;
use ropo::model::gguf;
use ropo::model::hf_config::HfConfig;
use ropo::model::LoadOptions;
use serde_json::Value;

const FAMILIES: [&str; 3] = ["gemma2", "gemma3", "phi3"];

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(family)
}

fn expected(family: &str) -> Value {
    let p = fixture(family).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// The fixtures' JSON arrays as f32 tensors ([`common::json_tensor`]).
fn tensor(v: &Value) -> Tensor {
    common::json_tensor(v)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn config_equals_the_hf_folders() {
    for family in FAMILIES {
        let parts = gguf::load(&fixture(family).join("model.gguf"), &Device::Cpu).unwrap();
        let cfg_path = fixture(family).join("config.json");
        let hf = HfConfig::from_path(&cfg_path).unwrap().into_config(&cfg_path).unwrap();
        assert_eq!(parts.config, hf, "{family}: GGUF config != HF config");
        let want_arch = match family {
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            _ => Arch::Phi3,
        };
        assert_eq!(parts.config.arch, want_arch);
        let x = &parts.config.extras;
        let global: Vec<usize> = (0..parts.config.num_hidden_layers).filter(|&i| x.window_of(i).is_none()).collect();
        println!("{family}: extras {x:?}; global layers {global:?}");
        match family {
            // the fixtures exercise llama.cpp's hard-coded patterns and Gemma 3's two RoPE bases
            "gemma2" => assert_eq!((global, x.sliding_window, x.attn_logit_softcapping), (vec![1], Some(4), Some(1.5))),
            "gemma3" => assert_eq!((global, x.rope_local_theta, x.rope_linear_factor), (vec![5], Some(1e4), Some(2.0))),
            _ => assert!(x.is_default() && !parts.config.tie_word_embeddings),
        }
    }
}

#[test]
fn tensors_equal_the_hf_safetensors() {
    for family in FAMILIES {
        let parts = gguf::load(&fixture(family).join("model.gguf"), &Device::Cpu).unwrap();
        let hf: BTreeMap<String, Tensor> = candle_core::safetensors::load(fixture(family).join("model.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
        assert_eq!(parts.tensors.keys().collect::<Vec<_>>(), hf.keys().collect::<Vec<_>>(), "{family}: tensor names");
        let (mut exact, mut norm_max) = (0, 0f64);
        for (name, want) in &hf {
            let got = &parts.tensors[name];
            assert_eq!(got.dims(), want.dims(), "{family} {name}");
            let d = max_abs(got, &want.to_dtype(DType::F32).unwrap());
            if family != "phi3" && name.ends_with("norm.weight") {
                // (1 + w) - 1 in f32: exact up to the rounding of 1 + w (half an ulp of [1, 2))
                assert!(d <= f32::EPSILON as f64 / 2.0 * 1.0001, "{family} {name}: {d}");
                norm_max = norm_max.max(d);
            } else {
                assert_eq!(d, 0.0, "{family} {name}");
                exact += 1;
            }
        }
        println!("{family}: {} tensors, {exact} bit-identical, norms within {norm_max:.2e}", hf.len());
    }
}

#[test]
fn logits_match_transformers() {
    for family in FAMILIES {
        let e = expected(family);
        let path = fixture(family).join("model.gguf");
        let m = ropo::model::load(path.to_str().unwrap(), &LoadOptions { dtype: DType::F32, ..Default::default() }).unwrap();
        let ids = tensor(&e["input_ids"]).to_dtype(DType::U32).unwrap();
        let mask = tensor(&e["attention_mask"]).to_dtype(DType::U32).unwrap();
        let lens: Vec<usize> = e["attention_mask"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().filter(|x| x.as_u64() == Some(1)).count()).collect();
        let logits = m.model.forward(&ids, Some(&mask), false).unwrap();
        let want = tensor(&e["logits"]);
        let scale = max_abs(&want, &want.zeros_like().unwrap());
        let d = lens.iter().enumerate().map(|(n, &l)| max_abs(&logits.i((n, 0..l)).unwrap(), &want.i((n, 0..l)).unwrap())).fold(0.0, f64::max);
        println!("{family} GGUF padded batch vs transformers: max |d logits| = {d:.3e} (max |logit| {scale:.3})");
        assert!(scale > 1.0, "{family}: logits too small to compare ({scale})");
        assert!(d < 1e-4, "{family}: logits differ from transformers' by {d}");
    }
}

#[test]
fn tokenizer_matches_transformers_gguf_tokenizer() {
    for family in FAMILIES {
        let e = expected(family);
        let path = fixture(family).join("model.gguf");
        let tok = gguf::load_tokenizer(&path).unwrap();
        let want = &e["tokenizer_json"];
        let ours: Value = serde_json::from_str(&tok.inner.to_string(false).unwrap()).unwrap();
        let vocab_size = ours["model"]["vocab"].as_object().unwrap().len();
        assert_eq!(ours["model"]["vocab"], want["model"]["vocab"], "{family}: vocab");
        assert_eq!(ours["model"]["merges"], want["model"]["merges"], "{family}: merges");
        for key in ["normalizer", "pre_tokenizer", "decoder"] {
            assert_eq!(ours[key], want[key], "{family}: {key}");
        }
        // transformers' GemmaTokenizer also adds a `<mask>` token past the file's vocabulary
        let added = |v: &Value| -> Vec<(u64, String, bool)> {
            let mut a: Vec<_> = v["added_tokens"].as_array().unwrap().iter().filter(|t| (t["id"].as_u64().unwrap() as usize) < vocab_size).map(|t| (t["id"].as_u64().unwrap(), t["content"].as_str().unwrap().to_string(), t["special"].as_bool().unwrap())).collect();
            a.sort();
            a
        };
        assert_eq!(added(&ours), added(want), "{family}: added tokens");
        let n_merges = want["model"]["merges"].as_array().unwrap().len();
        for case in e["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let plain = tok.inner.encode(text, false).unwrap();
            assert_eq!(plain.get_ids(), ids(&case["ids"]), "{family}: {text:?}");
            let special = tok.inner.encode(text, true).unwrap();
            assert_eq!(special.get_ids(), ids(&case["ids_with_special"]), "{family}: {text:?} with special tokens");
            if !case["sentencepiece_ids"].is_null() {
                assert_eq!(plain.get_ids(), ids(&case["sentencepiece_ids"]), "{family}: {text:?} vs SentencePiece");
            }
            let back = tok.inner.decode(plain.get_ids(), false).unwrap();
            assert_eq!(back, case["decoded"].as_str().unwrap(), "{family}: decode of {text:?}");
        }
        println!("{family}: {vocab_size} tokens, {n_merges} merges, {} strings tokenize as transformers", e["tokenize"].as_array().unwrap().len());
    }
}

/// The fixture's GGUF with `edit` applied to its metadata and tensors, as bytes.
fn edited(family: &str, edit: impl FnOnce(&mut HashMap<String, GValue>, &mut BTreeMap<String, QTensor>)) -> Vec<u8> {
    let data = std::fs::read(fixture(family).join("model.gguf")).unwrap();
    let content = Content::read(&mut Cursor::new(&data)).unwrap();
    let mut meta = content.metadata.clone();
    let mut tensors: BTreeMap<String, QTensor> = content.tensor_infos.keys().map(|n| (n.clone(), content.tensor(&mut Cursor::new(&data), n, &Device::Cpu).unwrap())).collect();
    edit(&mut meta, &mut tensors);
    let m: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &m, &t).unwrap();
    out.into_inner()
}

fn load_err(bytes: &[u8], name: &str) -> String {
    gguf::load_bytes(bytes, Path::new(name), &Device::Cpu).map(|p| p.tensors.len()).unwrap_err().to_string()
}

#[test]
fn bad_files_are_refused_naming_the_file() {
    let bytes = edited("gemma2", |m, _| {
        m.insert("general.architecture".into(), GValue::String("gemma4".into()));
    });
    let e = load_err(&bytes, "g4.gguf");
    assert!(e.contains("g4.gguf") && e.contains("unsupported GGUF architecture \"gemma4\""), "{e}");

    let bytes = edited("phi3", |m, _| {
        m.insert("tokenizer.ggml.model".into(), GValue::String("bert".into()));
    });
    let e = load_err(&bytes, "tok.gguf");
    assert!(e.contains("tok.gguf") && e.contains("tokenizer.ggml.model \"bert\""), "{e}");

    // Phi-3 128k: the converter writes rope_factors_long / _short tensors
    let bytes = edited("phi3", |_, t| {
        let f = QTensor::quantize(&Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(), candle_core::quantized::GgmlDType::F32).unwrap();
        t.insert("rope_factors_long.weight".into(), f);
    });
    let e = load_err(&bytes, "phi3-128k.gguf");
    assert!(e.contains("phi3-128k.gguf") && e.contains("rope_factors_long") && e.contains("128k"), "{e}");
    let bytes = edited("phi3", |m, _| {
        m.insert("phi3.rope.scaling.type".into(), GValue::String("longrope".into()));
    });
    let e = load_err(&bytes, "lr.gguf");
    assert!(e.contains("lr.gguf") && e.contains("longrope"), "{e}");
}

#[test]
fn sliding_window_pattern_key_overrides_the_hard_coded_one() {
    let pattern = [true, false, false, true, false, true];
    let bytes = edited("gemma3", |m, _| {
        m.insert("gemma3.attention.sliding_window_pattern".into(), GValue::Array(pattern.iter().map(|&b| GValue::Bool(b)).collect()));
    });
    let c = gguf::load_bytes(&bytes, Path::new("p.gguf"), &Device::Cpu).unwrap().config;
    assert_eq!(c.extras.sliding_layers, pattern);
    let bytes = edited("gemma3", |m, _| {
        m.insert("gemma3.attention.sliding_window_pattern".into(), GValue::U32(3));
    });
    let c = gguf::load_bytes(&bytes, Path::new("p.gguf"), &Device::Cpu).unwrap().config;
    assert_eq!(c.extras.sliding_layers, [true, true, false, true, true, false]);
    // a window of 0: every layer global; no window key: refused (llama.cpp requires it)
    let bytes = edited("gemma3", |m, _| {
        m.insert("gemma3.attention.sliding_window".into(), GValue::U32(0));
    });
    let c = gguf::load_bytes(&bytes, Path::new("p.gguf"), &Device::Cpu).unwrap().config;
    assert!(c.extras.sliding_window.is_none() && c.extras.sliding_layers.is_empty());
    let bytes = edited("gemma3", |m, _| {
        m.remove("gemma3.attention.sliding_window");
    });
    let e = gguf::load_bytes(&bytes, Path::new("p.gguf"), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("p.gguf") && e.contains("gemma3.attention.sliding_window"), "{e}");
}

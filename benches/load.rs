//! Loading and generation speed on the real model (SmolLM2-135M-Instruct.Q4_1.gguf):
//! - `gguf_load`: read + dequantize all 272 tensors to f32 + build the tokenizer;
//! - `hf_folder_load`: the same model exported as an f32 HF folder, loaded back;
//! - `generate_32_tokens`: greedy decoding with the KV cache after a 25-token chat prompt.
//!
//! Run: `cargo bench --bench load`.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use ropo::generate::{generate, GenerateOptions};
use ropo::model::{gguf, hf_folder, load, LoadOptions};

fn model_path() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-model.sh"))
        .output()
        .expect("running scripts/fetch-model.sh");
    assert!(out.status.success(), "fetch-model.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn bench(c: &mut Criterion) {
    let path = model_path();
    let dev = candle_core::Device::Cpu;
    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    g.bench_function("gguf_load", |b| b.iter(|| gguf::load(&path, &dev).unwrap()));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    let lm = load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    lm.export(&dir, candle_core::DType::F32).unwrap();
    g.bench_function("hf_folder_load", |b| b.iter(|| hf_folder::load(&dir, &dev).unwrap()));
    let prompt = "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n";
    let ids = lm.tokenizer.inner.encode(prompt, false).unwrap().get_ids().to_vec();
    // no EOS: always 32 new tokens
    let mut tok = lm.tokenizer.clone();
    tok.eos_token_ids.clear();
    let opts = GenerateOptions { max_new_tokens: 32, ..Default::default() };
    g.bench_function("generate_32_tokens", |b| b.iter(|| generate(&lm.model, &tok, &ids, &opts, false).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

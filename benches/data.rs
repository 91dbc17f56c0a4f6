//! Data pipeline throughput: loading (gunzip + JSON + HH parsing), tokenization with the real
//! SmolLM2 tokenizer and chat template, and sampling + collation.
//!
//! Run: `cargo bench --bench data` (needs the model: scripts/fetch-model.sh).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use ropo::data::batch::{collate_host, epoch_batches, SamplerConfig};
use ropo::data::tokenize::{PairTokenizer, TokenizeOptions};
use ropo::data::{load, LoadOptions};

fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel)
}

fn gguf() -> String {
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-model.sh"))
        .output()
        .expect("running scripts/fetch-model.sh");
    assert!(out.status.success(), "scripts/fetch-model.sh failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn bench(c: &mut Criterion) {
    let hh = shared("data/hh_rlhf_harmless/harmless-base-test.jsonl.gz");
    let orca = shared("data/orca_dpo_pairs/validation.jsonl");
    c.bench_function("load hh_rlhf harmless test (2312 rows, gz)", |b| {
        b.iter(|| load(&hh, &LoadOptions::default()).unwrap())
    });
    c.bench_function("load orca validation (284 rows)", |b| b.iter(|| load(&orca, &LoadOptions::default()).unwrap()));

    let tok = ropo::model::load_parts(&gguf(), &Default::default()).unwrap().tokenizer;
    let data = load(&orca, &LoadOptions::default()).unwrap();
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions { max_length: Some(1024), max_prompt_length: None }).unwrap();
    c.bench_function("tokenize orca validation (284 pairs, SmolLM2 template)", |b| {
        b.iter(|| pt.tokenize_all(&data.examples, &orca, &mut Default::default()).unwrap())
    });

    let pairs = pt.tokenize_all(&data.examples, &orca, &mut Default::default()).unwrap();
    let lengths: Vec<usize> = pairs.iter().map(|p| p.max_len()).collect();
    let cfg = SamplerConfig { batch_size: 8, ..Default::default() };
    c.bench_function("sample + collate one epoch of orca (B=8)", |b| {
        b.iter(|| {
            for batch in epoch_batches(&lengths, &cfg, 0).unwrap() {
                let refs: Vec<_> = batch.iter().map(|&i| &pairs[i]).collect();
                collate_host(&refs, 2).unwrap();
            }
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);

//! `ropo merge --out FILE.gguf`: the merged SmolLM2-135M (a perturbed RoPO adapter on q,k,v,o)
//! written as GGUF loads back in ropo with the HF-folder merge's logits: f32 within 1e-5
//! (the same f32 weights; only the Q/K permutation round trip and the reader differ), f16 and
//! q8_0 within a measured bound (printed; the README states the numbers). The tokenizer,
//! chat template and config survive the round trip; the file is written atomically and an
//! existing file is refused without --force. scripts/check_gguf.py reads the file with the
//! `gguf` Python package (every tensor, the metadata).

mod common;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use ropo::adapter::any::AnyAdapterSet;
use ropo::adapter::merge::{merge_to_folder, merge_to_gguf};
use ropo::config::AdapterSection;
use ropo::model::gguf_export::GgufDtype;
use ropo::model::{load, LoadOptions};

fn logits(source: &str, ids: &Tensor) -> Tensor {
    let lm = load(source, &LoadOptions::default()).unwrap();
    lm.model.forward(ids, None, false).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn merged_gguf_loads_back_with_the_folder_logits() {
    let gguf = common::smollm2_gguf();
    let src = gguf.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    {
        let mut lm = load(src, &LoadOptions::default()).unwrap();
        let set = AnyAdapterSet::inject(&mut lm.model, &AdapterSection::default(), src).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(18);
        for (_, var) in set.vars() {
            let noise = common::tiny::randn(var.dims(), 0.02, &mut rng, var.dtype());
            var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
        }
        set.save(&adapter).unwrap();
    }
    let opts = LoadOptions::default();
    let folder = tmp.path().join("merged");
    merge_to_folder(src, &opts, &adapter, &folder, DType::F32, false).unwrap();
    let ids = Tensor::new(&[[1u32, 504, 3458, 314, 260, 1345, 28, 198, 9, 33, 4777, 2]], &Device::Cpu).unwrap();
    let want = logits(folder.to_str().unwrap(), &ids);
    let base = logits(src, &ids);
    assert!(max_abs(&want, &base) > 1e-2, "the adapter must change the model");
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    // bounds: ~2x the measured max (f16 4.9e-2, q8_0 1.1) and mean (f16 ~5e-3, q8_0 ~0.1) errors
    for (dtype, bound, mean_bound) in [(GgufDtype::F32, 1e-5, 1e-6), (GgufDtype::F16, 0.1, 0.02), (GgufDtype::Q8_0, 2.5, 0.3)] {
        let out = tmp.path().join(format!("merged-{dtype:?}.gguf"));
        merge_to_gguf(src, &opts, &adapter, &out, dtype, false).unwrap();
        let got = logits(out.to_str().unwrap(), &ids);
        let err = max_abs(&got, &want);
        let mean = (&got - &want).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let same = got.argmax(2).unwrap().eq(&want.argmax(2).unwrap()).unwrap().to_dtype(DType::F32).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        println!("{dtype:?}: |logit - folder logit| max {err:.3e}, mean {mean:.3e} (logits up to {scale:.1}); same argmax at {:.0}% of positions; file {} bytes", 100.0 * same, std::fs::metadata(&out).unwrap().len());
        assert!(err <= bound && mean <= mean_bound, "{dtype:?}: max {err} > {bound} or mean {mean} > {mean_bound}");
        if dtype != GgufDtype::Q8_0 {
            assert_eq!(same, 1.0, "{dtype:?}: the same argmax at every position");
        }
    }
    // tokenizer, chat template and config survive
    let a = load(folder.to_str().unwrap(), &opts).unwrap();
    let b = load(tmp.path().join("merged-F32.gguf").to_str().unwrap(), &opts).unwrap();
    assert_eq!(a.tokenizer.chat_template, b.tokenizer.chat_template);
    assert!(b.tokenizer.chat_template.is_some());
    assert_eq!((a.tokenizer.bos_token.clone(), a.tokenizer.eos_token.clone()), (b.tokenizer.bos_token.clone(), b.tokenizer.eos_token.clone()));
    let text = "<|im_start|>user\nWhat is 15% of 200? Answer: 30.<|im_end|>\n";
    let enc = |t: &ropo::model::tokenizer::Tokenizer| t.inner.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(enc(&a.tokenizer), enc(&b.tokenizer));
    assert_eq!(a.config, b.config);
    // an existing file is refused without --force, replaced with it; no temporary left behind
    let out = tmp.path().join("merged-F32.gguf");
    let e = merge_to_gguf(src, &opts, &adapter, &out, GgufDtype::F32, false).unwrap_err().to_string();
    assert!(e.contains("exists (use --force"), "{e}");
    merge_to_gguf(src, &opts, &adapter, &out, GgufDtype::F32, true).unwrap();
    let left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.starts_with('.')).collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    if let Ok(dir) = std::env::var("ROPO_GGUF_EXPORT_DIR") {
        for d in ["F32", "F16", "Q8_0"] {
            std::fs::copy(tmp.path().join(format!("merged-{d}.gguf")), std::path::Path::new(&dir).join(format!("merged-{d}.gguf"))).unwrap();
        }
    }
}

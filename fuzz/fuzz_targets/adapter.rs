//! Adapter loading (`adapter_config.json` + `adapter_model.safetensors`; RoPO, PEFT LoRA and
//! full) onto a tiny model: any pair of files gives an adapter or an error, never a panic or an
//! allocation beyond what the files hold.
//!
//! Input: a mode byte. Mode 0: the rest is the config text, a NUL byte, then the safetensors
//! bytes. Otherwise the rest is a list of patches `(offset u32 LE, byte)` applied to a valid
//! saved adapter of kind `mode % 3` (config, NUL, weights); mode's bit 7 cuts it at the first
//! patch's offset.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use ropo::config::{AdapterKind, AdapterSection};
use ropo::model::config::{Arch, ModelConfig};
use ropo::model::llama::{random_weights, Model};

fn config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 32,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 16,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn model() -> Model {
    let cfg = config();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let w = random_weights(&cfg, 0.3, &mut rng, DType::F32, &Device::Cpu).unwrap();
    Model::load(candle_nn::VarBuilder::from_tensors(w.into_iter().collect(), DType::F32, &Device::Cpu), &cfg).unwrap()
}

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let d = base.join(format!("ropo-fuzz-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// A saved adapter of each kind (RoPO, LoRA, full): config bytes, NUL, weights bytes.
fn bases() -> &'static [Vec<u8>; 3] {
    static BASES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    BASES.get_or_init(|| {
        [AdapterKind::Ropo, AdapterKind::Lora, AdapterKind::Full].map(|kind| {
            let mut m = model();
            let mut section = AdapterSection { kind, lora_r: 2, householder_reflections: 2, ..Default::default() };
            if kind == AdapterKind::Full {
                section.target_modules = vec!["q_proj".into()];
            }
            let set = ropo::adapter::AnyAdapterSet::inject(&mut m, &section, "tiny").unwrap();
            let d = dir().join(format!("base-{kind:?}"));
            set.save(&d).unwrap();
            let mut out = std::fs::read(d.join("adapter_config.json")).unwrap();
            out.push(0);
            out.extend(std::fs::read(d.join("adapter_model.safetensors")).unwrap());
            ropo::adapter::AnyAdapterSet::load(&d, &mut model()).expect("the base adapter loads");
            out
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let files: Vec<u8> = if mode == 0 {
        rest.to_vec()
    } else {
        let mut f = bases()[(mode & 0x7f) as usize % 3].clone();
        let patches: Vec<(usize, u8)> = rest.chunks_exact(5).map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize, c[4])).collect();
        for &(at, b) in &patches {
            let n = f.len();
            f[at % n] = b;
        }
        if mode & 0x80 != 0 {
            if let Some(&(at, _)) = patches.first() {
                f.truncate(at % (f.len() + 1));
            }
        }
        f
    };
    let (cfg_text, weights) = match files.iter().position(|&b| b == 0) {
        Some(k) => (&files[..k], &files[k + 1..]),
        None => (&files[..], &[][..]),
    };
    let d = dir();
    std::fs::write(d.join("adapter_config.json"), cfg_text).unwrap();
    std::fs::write(d.join("adapter_model.safetensors"), weights).unwrap();
    let _ = ropo::adapter::AnyAdapterSet::load(d, &mut model());
});

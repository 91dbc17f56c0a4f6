//! The GGUF header and metadata parser, through `gguf::load_bytes`: any bytes give a model or
//! an error naming the file, never a panic or an allocation beyond what the data can hold.
//!
//! Input: a mode byte. Mode 0: the rest is the file. Otherwise the rest is a list of patches
//! `(offset u32 LE, byte)` applied to a small valid GGUF (a 1-layer llama with a 40-token
//! byte-level BPE tokenizer and a chat template, built once), and mode's bit 7 cuts it at the
//! first patch's offset: near-valid files reach every header field, the metadata and the tensors.
#![no_main]

use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;

fn base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dev = Device::Cpu;
        let t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            QTensor::quantize(&Tensor::from_vec(v, shape, &dev).unwrap(), GgmlDType::F32).unwrap()
        };
        let (v, h, f) = (40, 8, 12);
        let tensors: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), t(&[v, h])),
            ("output_norm.weight".into(), t(&[h])),
            ("blk.0.attn_norm.weight".into(), t(&[h])),
            ("blk.0.ffn_norm.weight".into(), t(&[h])),
            ("blk.0.attn_q.weight".into(), t(&[h, h])),
            ("blk.0.attn_k.weight".into(), t(&[4, h])),
            ("blk.0.attn_v.weight".into(), t(&[4, h])),
            ("blk.0.attn_output.weight".into(), t(&[h, h])),
            ("blk.0.ffn_gate.weight".into(), t(&[f, h])),
            ("blk.0.ffn_up.weight".into(), t(&[f, h])),
            ("blk.0.ffn_down.weight".into(), t(&[h, f])),
        ];
        let mut tokens: Vec<Value> = (b'a'..=b'z').map(|c| Value::String((c as char).to_string())).collect();
        tokens.extend(["Ġ", "Ċ", "ab", "ba", "<|im_start|>", "<|im_end|>", "<|endoftext|>"].map(|s| Value::String(s.into())));
        while tokens.len() < v {
            tokens.push(Value::String(format!("x{}", tokens.len())));
        }
        let types: Vec<Value> = (0..v).map(|i| Value::I32(if (30..33).contains(&i) { 3 } else { 1 })).collect();
        let meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.alignment", Value::U32(32)),
            ("llama.block_count", Value::U32(1)),
            ("llama.context_length", Value::U32(64)),
            ("llama.embedding_length", Value::U32(h as u32)),
            ("llama.feed_forward_length", Value::U32(f as u32)),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.attention.head_count_kv", Value::U32(1)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into()), Value::String("b a".into())])),
            ("tokenizer.ggml.bos_token_id", Value::U32(30)),
            ("tokenizer.ggml.eos_token_id", Value::U32(31)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.chat_template", Value::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into())),
        ];
        let mut out = std::io::Cursor::new(Vec::new());
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut out, &meta_refs, &t_refs).unwrap();
        let bytes = out.into_inner();
        ropo::model::gguf::load_bytes(&bytes, std::path::Path::new("base.gguf"), &dev).expect("the base GGUF loads");
        bytes
    })
}

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("f.gguf");
    let Some((&mode, rest)) = data.split_first() else { return };
    let file: Vec<u8> = if mode == 0 {
        rest.to_vec()
    } else {
        let mut f = base().to_vec();
        let patches: Vec<(usize, u8)> = rest.chunks_exact(5).map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize, c[4])).collect();
        for &(at, b) in &patches {
            if !f.is_empty() {
                let n = f.len();
                f[at % n] = b;
            }
        }
        if mode & 0x80 != 0 {
            if let Some(&(at, _)) = patches.first() {
                f.truncate(at % (f.len() + 1));
            }
        }
        f
    };
    if let Err(e) = ropo::model::gguf::load_bytes(&file, path, &candle_core::Device::Cpu) {
        assert!(e.to_string().starts_with("f.gguf"), "error without the file: {e}");
    }
});

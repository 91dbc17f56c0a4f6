//! Tokenizer parity: the tokenizer built from the GGUF's `tokenizer.ggml.*` metadata gives the
//! ids of transformers' tokenizer (../shared/golden/smollm2_golden.json `tokenization.*`, made
//! by HF tokenizers 0.23.3 from the same GGUF), and the GGUF's chat template renders like
//! transformers' `apply_chat_template` (`chat_template.*`).

mod common;

use ropo::data::template::{ChatTemplate, Message};
use ropo::model::gguf;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn gguf_tokenizer_matches_golden_ids() {
    let g = common::golden("smollm2_golden.json");
    let m = gguf::load(&common::smollm2_gguf(), &candle_core::Device::Cpu).unwrap();
    let tok = &m.tokenizer.inner;
    let cases = g["tokenization"].as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (name, case) in cases {
        let text = case["text"].as_str().unwrap();
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids(), ids(&case["ids"]).as_slice(), "ids of {name}");
        let toks: Vec<String> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        assert_eq!(enc.get_tokens(), toks.as_slice(), "tokens of {name}");
        // decode(encode(text)) == text (golden: decode_roundtrip_equal)
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text, "round trip of {name}");
    }
    // The chat rendering with an assistant turn tokenizes like transformers.
    let ct = &g["chat_template"];
    let enc = tok.encode(ct["rendered_with_assistant"].as_str().unwrap(), false).unwrap();
    assert_eq!(enc.get_ids(), ids(&ct["ids_with_assistant"]).as_slice());
}

#[test]
fn gguf_chat_template_renders_like_transformers() {
    let g = common::golden("smollm2_golden.json");
    let m = gguf::load(&common::smollm2_gguf(), &candle_core::Device::Cpu).unwrap();
    let t = &m.tokenizer;
    let src = t.chat_template.as_deref().expect("the GGUF has tokenizer.chat_template");
    assert_eq!(src, g["chat_template"]["template"].as_str().unwrap());
    assert_eq!(t.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(t.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(t.eos_token_ids, vec![2]);
    let tmpl = ChatTemplate::new(src, t.bos_token.as_deref(), t.eos_token.as_deref()).unwrap();
    let ct = &g["chat_template"];
    let msgs = |k: &str| -> Vec<Message> { serde_json::from_value(ct[k].clone()).unwrap() };
    assert_eq!(tmpl.render(&msgs("messages"), true).unwrap(), ct["rendered_add_generation_prompt_true"].as_str().unwrap());
    assert_eq!(tmpl.render(&msgs("messages"), false).unwrap(), ct["rendered_add_generation_prompt_false"].as_str().unwrap());
    assert_eq!(tmpl.render(&msgs("messages_with_assistant"), false).unwrap(), ct["rendered_with_assistant"].as_str().unwrap());
    assert_eq!(
        tmpl.render(&msgs("messages_no_system"), true).unwrap(),
        ct["rendered_no_system_add_generation_prompt_true"].as_str().unwrap()
    );
}

//! Chat template rendering + tokenization + truncation with SmolLM2's tokenizer and template:
//! every kept pair keeps the data rule (`PairTokenizer::violation` is `None`, both sequences
//! within `max_length`, the completion the final answer), every other row is refused with its
//! line (an error naming `f.jsonl:1`, or a counted skip); never a panic.
#![no_main]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ropo::data::tokenize::{PairTokenizer, TokenizeOptions};
use ropo::data::{parse_reader, LoadOptions, Pair};
use ropo::model::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = std::env::var("ROPO_FUZZ_GGUF").unwrap_or_else(|_| {
            format!("{}/.cache/ropo/models/SmolLM2-135M-Instruct.Q4_1.gguf", std::env::var("HOME").unwrap_or_default())
        });
        ropo::model::gguf::load_tokenizer(Path::new(&path)).expect("the SmolLM2 GGUF (scripts/fetch-model.sh; or ROPO_FUZZ_GGUF)")
    })
}

/// One tokenizer per `max_length` (building one clones the tokenizer and compiles the template:
/// too slow to do per input).
fn pair_tokenizer(max_length: usize) -> &'static PairTokenizer<'static> {
    static CACHE: OnceLock<Mutex<HashMap<usize, &'static PairTokenizer<'static>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    cache.entry(max_length).or_insert_with(|| {
        let opts = TokenizeOptions { max_length: Some(max_length), max_prompt_length: None };
        Box::leak(Box::new(PairTokenizer::new(tokenizer(), None, opts).unwrap()))
    })
}

/// Text pieces that break rows in the known ways, mixed with arbitrary text.
#[derive(Debug, Arbitrary)]
enum Piece {
    Text(String),
    ImEnd,
    ImStart,
    EndOfText,
    Newline,
    Space,
    HhHuman,
    HhAssistant,
}

fn text(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(s) => s.as_str(),
            Piece::ImEnd => "<|im_end|>",
            Piece::ImStart => "<|im_start|>",
            Piece::EndOfText => "<|endoftext|>",
            Piece::Newline => "\n",
            Piece::Space => " ",
            Piece::HhHuman => "\n\nHuman:",
            Piece::HhAssistant => "\n\nAssistant:",
        })
        .collect()
}

#[derive(Debug, Arbitrary)]
struct Msg {
    role: u8,
    content: Vec<Piece>,
}

fn messages(m: &[Msg]) -> Value {
    let roles = ["user", "assistant", "system", "robot"];
    m.iter().map(|m| json!({"role": roles[m.role as usize % 4], "content": text(&m.content)})).collect()
}

#[derive(Debug, Arbitrary)]
struct Row {
    format: u8,
    prompt: Vec<Msg>,
    chosen: Vec<Msg>,
    rejected: Vec<Msg>,
    prompt_text: Vec<Piece>,
    chosen_text: Vec<Piece>,
    rejected_text: Vec<Piece>,
    max_length: u8,
}

fn row(r: &Row) -> Value {
    let (p, c, rj) = (text(&r.prompt_text), text(&r.chosen_text), text(&r.rejected_text));
    match r.format % 7 {
        0 => json!({"prompt": p, "chosen": c, "rejected": rj}),
        1 => json!({"chosen": format!("{p}{c}"), "rejected": format!("{p}{rj}")}),
        2 => {
            let shared: Vec<Value> = messages(&r.prompt).as_array().cloned().unwrap_or_default();
            let side = |m: &[Msg]| -> Value { shared.iter().cloned().chain(messages(m).as_array().cloned().unwrap_or_default()).collect() };
            json!({"chosen": side(&r.chosen), "rejected": side(&r.rejected)})
        }
        3 => json!({"prompt": messages(&r.prompt), "chosen": messages(&r.chosen), "rejected": messages(&r.rejected)}),
        4 => json!({"input": {"messages": messages(&r.prompt)}, "preferred_output": messages(&r.chosen), "non_preferred_output": messages(&r.rejected)}),
        5 => json!({"chosen": format!("\n\nHuman: {p}\n\nAssistant: {c}"), "rejected": format!("\n\nHuman: {p}\n\nAssistant: {rj}")}),
        _ => json!({"conversations": [{"from": "human", "value": p}], "chosen": {"from": "gpt", "value": c}, "rejected": {"from": "gpt", "value": rj}}),
    }
}

fuzz_target!(|r: Row| {
    let tok = tokenizer();
    let line = format!("{}\n", row(&r));
    let loaded = match parse_reader(line.as_bytes(), "f.jsonl", &LoadOptions::default()) {
        Ok(l) => l,
        Err(e) => {
            assert!(e.to_string().starts_with("f.jsonl:1: "), "refused without its line: {e}");
            return;
        }
    };
    let max_length = [3, 8, 16, 24, 40, 64, 128, 512][r.max_length as usize % 8];
    let pt = pair_tokenizer(max_length);
    let mut report = loaded.report.clone();
    let pairs = match pt.tokenize_all(&loaded.examples, Path::new("f.jsonl"), &mut report) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.to_string().starts_with("f.jsonl:1: "), "refused without its line: {e}");
            return;
        }
    };
    assert_eq!(pairs.len() + report.total_skipped(), 1, "kept or counted: {report}");
    for c in report.skipped.values() {
        assert_eq!(c.first_lines, vec![1]);
    }
    let im_end = tok.inner.token_to_id("<|im_end|>").unwrap();
    for t in &pairs {
        assert_eq!(pt.violation(t), None, "{t:?}");
        assert!(t.max_len() <= max_length);
        assert!(!t.prompt_ids.is_empty() && t.chosen_ids != t.rejected_ids);
        if report.truncated.count == 0 {
            for c in [&t.chosen_ids, &t.rejected_ids] {
                match &loaded.examples[0].pair {
                    // ChatML: one end-of-turn per assistant message, then "\n"
                    Pair::Chat { chosen, .. } if chosen.len() == 1 && c == &t.chosen_ids => {
                        assert_eq!(c.iter().filter(|&&i| i == im_end).count(), 1, "{:?}", tok.inner.decode(c, false));
                    }
                    Pair::Text { .. } => assert_eq!(c.last(), Some(&im_end)),
                    _ => {}
                }
            }
        }
    }
});

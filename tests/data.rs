//! Preference data: the real shared files, every bad-input case, and tokenization properties.

mod common;

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use ropo::data::batch::collate_host;
use ropo::data::formats::Format;
use ropo::data::tokenize::{PairTokenizer, TokenizeOptions};
use ropo::data::{load, parse_reader, ChatTemplate, LoadOptions, Message, OnIdentical, Pair, PreferenceExample, SkipReason};
use ropo::model::tokenizer::Tokenizer;

fn parse(text: &[u8], name: &str) -> ropo::error::Result<ropo::data::Loaded> {
    parse_reader(text, name, &LoadOptions::default())
}

fn parse_err(text: &[u8], name: &str) -> String {
    match parse(text, name) {
        Ok(l) => panic!("expected an error, got {} pairs", l.examples.len()),
        Err(e) => e.to_string(),
    }
}

const GOOD: &str = r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#;

// ---------------------------------------------------------------- the shared files

#[test]
fn orca_validation_loads_as_openai_format() {
    let got = load(common::shared("data/orca_dpo_pairs/validation.jsonl"), &LoadOptions::default()).unwrap();
    assert_eq!(got.format, Format::Openai);
    assert_eq!(got.report.rows_read, 284);
    assert_eq!(got.examples.len(), 284, "{}", got.report);
    assert_eq!(got.report.total_skipped(), 0);
    let Pair::Chat { prompt, chosen, rejected } = &got.examples[0].pair else { panic!("not a conversation") };
    assert_eq!(prompt.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["system", "user"]);
    assert!(prompt[1].content.starts_with("MM. Georges Colombier"));
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0].role, "assistant");
    assert!(chosen[0].content.starts_with("Step 1: Identify the names"));
    assert!(rejected[0].content.starts_with("Sure, I'd be happy to help!"));
}

#[test]
fn hh_harmless_test_loads_as_hh_with_no_shared_prompt_rows_counted() {
    let got = load(common::shared("data/hh_rlhf_harmless/harmless-base-test.jsonl.gz"), &LoadOptions::default()).unwrap();
    assert_eq!(got.format, Format::Hh);
    assert_eq!(got.report.rows_read, 2312);
    // ../shared/data/README.md: four rows do not share a prompt up to the last "\n\nAssistant:"
    // (found with Python: rejected.startswith(chosen[:chosen.rfind(M) + len(M)]) is False).
    let no_prompt = &got.report.skipped[&SkipReason::NoSharedPrompt];
    assert_eq!(no_prompt.count, 4);
    assert_eq!(no_prompt.first_lines, vec![1255, 1689, 1953, 2037]);
    // four more have an empty chosen answer (the transcript ends with "\n\nAssistant: ")
    let empty = &got.report.skipped[&SkipReason::EmptyChosen];
    assert_eq!(empty.first_lines, vec![87, 517, 926, 1104]);
    assert_eq!(empty.count, 4);
    assert_eq!(got.report.total_skipped(), 8, "{}", got.report);
    assert_eq!(got.examples.len(), 2304);
    // line 1: two human turns, the prompt ends with the second one
    let Pair::Chat { prompt, chosen, .. } = &got.examples[0].pair else { panic!("not a conversation") };
    assert_eq!(prompt[0], Message::new("user", "what are some pranks with a pen i can do?"));
    assert_eq!(prompt[1], Message::new("assistant", "Are you looking for practical joke ideas?"));
    assert_eq!(prompt.last().unwrap().role, "user");
    assert!(chosen[0].content.starts_with("No, sorry!"), "{:?}", chosen[0].content);
}

/// data/concise_prefs/README.md: with SmolLM2's template every row is under 150 tokens.
#[test]
fn shipped_concise_prefs_fit_in_150_tokens() {
    let tok = smollm2_tokenizer();
    for name in ["train", "eval"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("data/concise_prefs/{name}.jsonl"));
        let p = ropo::data::prepare(&path, &tok, None, &LoadOptions::default(), TokenizeOptions::default()).unwrap();
        assert_eq!(p.report.prompt_mismatch.count, 0);
        let longest = p.lengths().into_iter().max().unwrap();
        assert!(longest < 150, "{name}: {longest} tokens");
    }
}

#[test]
fn shipped_concise_prefs_load_as_conversational() {
    for (name, n) in [("train", 205), ("eval", 60)] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("data/concise_prefs/{name}.jsonl"));
        let got = load(&path, &LoadOptions::default()).unwrap();
        assert_eq!(got.format, Format::Conversational);
        assert_eq!((got.report.rows_read, got.examples.len()), (n, n), "{}", got.report);
    }
}

// ---------------------------------------------------------------- bad input, one test each

#[test]
fn malformed_json_names_file_line_and_column() {
    let text = format!("{GOOD}\n{{\"prompt\": \"p\", \"chosen\": \"a\" \"rejected\": \"b\"}}\n");
    assert_eq!(parse_err(text.as_bytes(), "t.jsonl"), "t.jsonl:2:31: invalid JSON: expected `,` or `}`");
    let text = format!("[\n{GOOD},\n{GOOD}\n,,]");
    assert_eq!(parse_err(text.as_bytes(), "t.json"), "t.json:4:2: invalid JSON: expected value");
}

#[test]
fn missing_field_names_field_and_line() {
    let text = format!("{GOOD}\n{GOOD}\n{{\"prompt\": \"p\", \"chosen\": \"a\"}}\n");
    assert_eq!(parse_err(text.as_bytes(), "t.jsonl"), "t.jsonl:3: missing field \"rejected\"");
    let text = r#"{"input": {"messages": [{"role": "user"}]}, "preferred_output": [], "non_preferred_output": []}"#;
    assert_eq!(parse_err(text.as_bytes(), "t.jsonl"), "t.jsonl:1: missing field \"input.messages[0].content\"");
}

#[test]
fn wrong_type_names_field_and_line() {
    let text = format!("{GOOD}\n{{\"prompt\": \"p\", \"chosen\": [\"a\"], \"rejected\": \"b\"}}\n");
    assert_eq!(parse_err(text.as_bytes(), "t.jsonl"), "t.jsonl:2: field \"chosen\": expected a string, got a list");
    let text = r#"{"prompt": [{"role": "user", "content": null}], "chosen": [], "rejected": []}"#;
    assert_eq!(
        parse_err(text.as_bytes(), "t.jsonl"),
        "t.jsonl:1: field \"prompt[0].content\": expected a string or a list of text parts, got null"
    );
    assert_eq!(parse_err(b"[1, 2]", "t.json"), "t.json:1: a row must be a JSON object, got a number");
}

#[test]
fn empty_chosen_or_rejected_is_a_counted_skip_with_its_line() {
    let text = format!(
        "{GOOD}\n{}\n{}\n",
        r#"{"prompt": "p", "chosen": "", "rejected": "b"}"#,
        r#"{"prompt": "p", "chosen": "a", "rejected": "  "}"#,
    );
    let got = parse(text.as_bytes(), "t.jsonl").unwrap();
    assert_eq!(got.examples.len(), 1);
    assert_eq!(got.report.skipped[&SkipReason::EmptyChosen].first_lines, vec![2]);
    assert_eq!(got.report.skipped[&SkipReason::EmptyRejected].first_lines, vec![3]);
    let shown = got.report.to_string();
    assert!(shown.contains("empty chosen: 1 (lines 2)"), "{shown}");
    let conv = r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let got = parse(conv.as_bytes(), "c.jsonl").unwrap();
    assert_eq!(got.report.skipped[&SkipReason::EmptyChosen].first_lines, vec![1]);
}

#[test]
fn identical_chosen_rejected_is_skipped_or_an_error_per_config() {
    let text = format!("{GOOD}\n{}\n", r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#);
    let got = parse(text.as_bytes(), "t.jsonl").unwrap();
    assert_eq!(got.examples.len(), 1);
    assert_eq!(got.report.skipped[&SkipReason::Identical].first_lines, vec![2]);
    let opts = LoadOptions { on_identical: OnIdentical::Error, ..Default::default() };
    let e = parse_reader(text.as_bytes(), "t.jsonl", &opts).unwrap_err().to_string();
    assert!(e.starts_with("t.jsonl:2: chosen is identical to rejected"), "{e}");
}

#[test]
fn empty_file_is_an_error() {
    assert_eq!(parse_err(b"", "t.jsonl"), "t.jsonl: empty file: no rows");
    assert_eq!(parse_err(b"\n  \n\n", "t.jsonl"), "t.jsonl: empty file: no rows");
    assert_eq!(parse_err(b"[]", "t.json"), "t.json: empty file: no rows");
}

#[test]
fn invalid_utf8_names_line_and_column() {
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"{\"prompt\": \"\xff\"}\n");
    assert_eq!(parse_err(&bytes, "t.jsonl"), "t.jsonl:2:13: invalid UTF-8");
}

#[test]
fn corrupt_gzip_is_an_error() {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(format!("{GOOD}\n{GOOD}\n").as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    // cut in the middle of the deflate stream
    let e = parse_err(&gz[..gz.len() / 2], "t.jsonl.gz");
    assert!(e.starts_with("t.jsonl.gz: corrupt gzip data"), "{e}");
    // a flipped byte in the stream or checksum
    let mut bad = gz.clone();
    let n = bad.len();
    bad[n - 6] ^= 0xff;
    let e = parse_err(&bad, "t.jsonl.gz");
    assert!(e.starts_with("t.jsonl.gz: corrupt gzip data"), "{e}");
    // a .gz name without gzip data
    assert_eq!(
        parse_err(GOOD.as_bytes(), "t.jsonl.gz"),
        "t.jsonl.gz: corrupt gzip data: no gzip header (the name ends in .gz)"
    );
    // through load(): a real file
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl.gz");
    std::fs::write(&path, &gz[..20]).unwrap();
    let e = load(&path, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: corrupt gzip data", path.display())), "{e}");
}

#[test]
fn mixed_formats_name_the_first_odd_line() {
    let conv = r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    let text = format!("{GOOD}\n{GOOD}\n\n{conv}\n{conv}\n");
    assert_eq!(
        parse_err(text.as_bytes(), "t.jsonl"),
        "t.jsonl:4: row is in format conversational, but the file's format is standard (detected from line 1); \
         a file must not mix formats (or force one with --format)"
    );
}

#[test]
fn undetectable_row_lists_its_keys() {
    let e = parse_err(br#"{"question": "q", "answer": "a"}"#, "t.jsonl");
    assert!(e.starts_with("t.jsonl:1: cannot detect the row format from keys [answer, question]"), "{e}");
}

#[test]
fn forced_format_reads_rows_as_that_format() {
    // an HH transcript forced to implicit_prompt: the prompt is cut after the last shared "\n\nAssistant:"
    let row = r#"{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}"#;
    let opts = LoadOptions { format: Some(Format::ImplicitPrompt), ..Default::default() };
    let got = parse_reader(row.as_bytes(), "t.jsonl", &opts).unwrap();
    assert_eq!(got.format, Format::ImplicitPrompt);
    assert_eq!(
        got.examples[0].pair,
        Pair::Text { prompt: "\n\nHuman: hi\n\nAssistant:".into(), chosen: " yes".into(), rejected: " no".into() }
    );
    // forcing a format the rows are not in: the missing field is named
    let opts = LoadOptions { format: Some(Format::Openai), ..Default::default() };
    let e = parse_reader(GOOD.as_bytes(), "t.jsonl", &opts).unwrap_err().to_string();
    assert_eq!(e, "t.jsonl:1: missing field \"input\"");
}

#[test]
fn sharegpt_and_json_array_files() {
    let text = r#"[
  {"conversations": [{"from": "human", "value": "q1"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
  {"conversations": [{"from": "human", "value": "q2"}], "system": "s",
   "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "human", "value": "d"}}
]"#;
    let e = parse_err(text.as_bytes(), "t.json");
    assert_eq!(e, "t.json:3: field \"rejected.from\": expected \"gpt\" for an answer, got \"human\"");
}

/// The shared orca_dpo_pairs rows rewritten into Intel's own layout (axolotl `chatml.intel`:
/// `system`, `question`, `chosen`, `rejected`) load, detected, as the same pairs as the OpenAI file.
#[test]
fn orca_in_axolotl_intel_layout_loads_as_the_openai_pairs() {
    let openai = load(common::shared("data/orca_dpo_pairs/validation.jsonl"), &LoadOptions::default()).unwrap();
    let text = std::fs::read_to_string(common::shared("data/orca_dpo_pairs/validation.jsonl")).unwrap();
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let m = &r["input"]["messages"];
        assert_eq!((m[0]["role"].as_str(), m[1]["role"].as_str()), (Some("system"), Some("user")));
        let row = serde_json::json!({
            "system": m[0]["content"], "question": m[1]["content"],
            "chosen": r["preferred_output"][0]["content"], "rejected": r["non_preferred_output"][0]["content"],
        });
        out.push_str(&format!("{row}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orca_intel.jsonl");
    std::fs::write(&path, out).unwrap();
    let got = load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(got.format, Format::AxolotlIntel);
    assert_eq!(got.report.rows_read, 284);
    assert_eq!(got.examples, openai.examples);
    // forced to prompt_pairs the `prompt` field is missing, named with the line
    let opts = LoadOptions { format: Some(Format::AxolotlPromptPairs), ..Default::default() };
    let e = load(&path, &opts).unwrap_err().to_string();
    assert!(e.ends_with("orca_intel.jsonl:1: missing field \"prompt\""), "{e}");
}

#[test]
fn alpaca_and_nectar_files_load() {
    let text = concat!(
        r#"{"instruction": "Translate to English", "input": "Bonjour", "chosen": "Hello", "rejected": "Goodbye", "history": [["Hi", "Hello!"]]}"#,
        "\n",
        r#"{"instruction": "Say hi", "input": "", "chosen": "hi", "rejected": "hi"}"#,
        "\n",
        r#"{"instruction": "Say hi", "chosen": "hi", "rejected": null}"#,
        "\n",
    );
    let e = parse_err(text.as_bytes(), "a.jsonl");
    assert_eq!(e, "a.jsonl:3: field \"rejected\": expected a string, got null");
    let two: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    let got = parse(two.as_bytes(), "a.jsonl").unwrap();
    assert_eq!(got.format, Format::Alpaca);
    assert_eq!(got.examples.len(), 1);
    assert_eq!(got.report.skipped[&SkipReason::Identical].first_lines, vec![2]);
    let Pair::Chat { prompt, .. } = &got.examples[0].pair else { panic!("not a conversation") };
    assert_eq!(prompt.last().unwrap(), &Message::new("user", "Translate to English\nBonjour"));
    let nectar = r#"{"prompt": "\n\nHuman: hi\n\nAssistant: ", "answers": [{"answer": "b", "rank": 2}, {"answer": "a", "rank": 1}]}"#;
    let got = parse(nectar.as_bytes(), "n.jsonl").unwrap();
    assert_eq!(got.format, Format::AxolotlNectar);
    let Pair::Chat { chosen, rejected, .. } = &got.examples[0].pair else { panic!("not a conversation") };
    assert_eq!((chosen[0].content.as_str(), rejected[0].content.as_str()), ("a", "b"));
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let e = load("/nonexistent/x.jsonl", &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/x.jsonl: cannot open"), "{e}");
}

// ---------------------------------------------------------------- tokenization with a small tokenizer

/// GPT-2's byte -> printable char map (the ByteLevel alphabet).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        map[b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// A byte-level BPE: 256 byte tokens, a few merges (so tokens span bytes), and the ChatML
/// special tokens `<|endoftext|>` `<|im_start|>` `<|im_end|>` — the SmolLM2 layout in small.
fn small_tokenizer(with_template: bool) -> Tokenizer {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("an", "d"), ("Ġ", "a")];
    for (a, b) in merges {
        let id = vocab.len();
        vocab.insert(format!("{a}{b}"), id.into());
    }
    let n = vocab.len();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": n + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        })
        .collect();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), (n + i).into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    });
    let inner: tokenizers::Tokenizer = json.to_string().parse().unwrap();
    let template = common::golden("smollm2_golden.json")["chat_template"]["template"].as_str().unwrap().to_string();
    Tokenizer {
        eos_token_ids: vec![inner.token_to_id("<|im_end|>").unwrap()],
        inner,
        chat_template: with_template.then_some(template),
        bos_token: Some("<|im_start|>".into()),
        eos_token: Some("<|im_end|>".into()),
    }
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.inner.encode(text, false).unwrap().get_ids().to_vec()
}

fn chat_example(prompt: Vec<Message>, chosen: &str, rejected: &str) -> PreferenceExample {
    PreferenceExample {
        line: 1,
        pair: Pair::Chat {
            prompt,
            chosen: vec![Message::new("assistant", chosen)],
            rejected: vec![Message::new("assistant", rejected)],
        },
    }
}

#[test]
fn small_tokenizer_merges_and_special_tokens_work() {
    let tok = small_tokenizer(true);
    let ids = encode(&tok, "<|im_start|>the and<|im_end|>");
    let toks: Vec<String> = ids.iter().map(|&i| tok.inner.id_to_token(i).unwrap()).collect();
    assert_eq!(toks, ["<|im_start|>", "t", "he", "Ġ", "and", "<|im_end|>"]);
}

#[test]
fn chat_completion_ends_with_end_of_turn_and_has_no_doubled_bos() {
    let tok = small_tokenizer(true);
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions::default()).unwrap();
    let ex = chat_example(vec![Message::new("user", "hi")], "the answer", "no");
    let mut report = Default::default();
    let t = pt.tokenize(&ex, Path::new("t"), &mut report).unwrap().unwrap();
    let im_start = tok.inner.token_to_id("<|im_start|>").unwrap();
    let im_end = tok.inner.token_to_id("<|im_end|>").unwrap();
    let nl = tok.inner.token_to_id("Ċ").unwrap();
    assert_eq!(t.prompt_ids[0], im_start);
    assert_ne!(t.prompt_ids[1], im_start, "BOS doubled");
    assert_eq!(&t.chosen_ids[t.chosen_ids.len() - 2..], &[im_end, nl]);
    assert!(tok.inner.decode(&t.prompt_ids, false).unwrap().ends_with("<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(report.prompt_mismatch.count, 0);
}

#[test]
fn conversation_without_a_template_is_a_clear_error() {
    let tok = small_tokenizer(false);
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions::default()).unwrap();
    let mut ex = chat_example(vec![Message::new("user", "hi")], "a", "b");
    ex.line = 7;
    let e = pt.tokenize_all(&[ex.clone()], Path::new("d.jsonl"), &mut Default::default()).unwrap_err().to_string();
    assert!(e.starts_with("d.jsonl:7: the rows are conversations and need a chat template"), "{e}");
    // a template supplied in the config fixes it
    let tmpl = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let pt = PairTokenizer::new(&tok, Some(tmpl), TokenizeOptions::default()).unwrap();
    assert_eq!(pt.tokenize_all(&[ex], Path::new("d.jsonl"), &mut Default::default()).unwrap().len(), 1);
}

#[test]
fn template_exception_names_the_row() {
    let tok = small_tokenizer(false);
    let tmpl = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}x";
    let pt = PairTokenizer::new(&tok, Some(tmpl), TokenizeOptions::default()).unwrap();
    let mut ex = chat_example(vec![Message::new("system", "s")], "a", "b");
    ex.line = 3;
    let e = pt.tokenize_all(&[ex], Path::new("d.jsonl"), &mut Default::default()).unwrap_err().to_string();
    assert!(e.starts_with("d.jsonl:3: chat template:") && e.contains("first message must be user"), "{e}");
}

#[test]
fn text_rows_get_eos_and_no_template() {
    let tok = small_tokenizer(false);
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions::default()).unwrap();
    let ex = PreferenceExample { line: 1, pair: Pair::Text { prompt: "Q: the".into(), chosen: " and".into(), rejected: " in<|im_end|>".into() } };
    let t = pt.tokenize(&ex, Path::new("t"), &mut Default::default()).unwrap().unwrap();
    assert_eq!(t.prompt_ids, encode(&tok, "Q: the"));
    assert_eq!(t.chosen_input_ids(), encode(&tok, "Q: the and<|im_end|>"));
    // already ends with EOS: not doubled
    assert_eq!(t.rejected_input_ids(), encode(&tok, "Q: the in<|im_end|>"));
}

#[test]
fn prompt_reaching_max_length_is_dropped_and_counted() {
    let tok = small_tokenizer(true);
    let ex = chat_example(vec![Message::new("user", "hello there")], "a", "b");
    let n_prompt = PairTokenizer::new(&tok, None, TokenizeOptions::default()).unwrap().encode(&ex, Path::new("t")).unwrap().unwrap().prompt_ids.len();
    let mut report = Default::default();
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions { max_length: Some(n_prompt), max_prompt_length: None }).unwrap();
    assert!(pt.tokenize(&ex, Path::new("t"), &mut report).unwrap().is_none());
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions { max_length: Some(n_prompt + 1), max_prompt_length: None }).unwrap();
    let t = pt.tokenize(&ex, Path::new("t"), &mut report).unwrap().unwrap();
    assert_eq!((t.chosen_ids.len(), t.rejected_ids.len()), (1, 1));
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions { max_length: None, max_prompt_length: Some(n_prompt - 1) }).unwrap();
    assert!(pt.tokenize(&ex, Path::new("t"), &mut report).unwrap().is_none());
    assert_eq!(report.skipped_for(SkipReason::PromptTooLong), 1);
    assert_eq!(report.skipped_for(SkipReason::PromptOverMaxPromptLength), 1);
    assert_eq!(report.truncated.count, 1);
}

fn content() -> impl Strategy<Value = String> {
    // letters, spaces, newlines, punctuation and multi-byte characters; never blank
    "[a-zA-Z0-9 .,!?'\n\u{e9}\u{20ac}\u{65e5}]{1,40}".prop_filter("not blank", |s| !s.trim().is_empty())
}

fn conversation() -> impl Strategy<Value = Vec<Message>> {
    (proptest::option::of(content()), proptest::collection::vec((content(), content()), 0..3), content()).prop_map(
        |(system, turns, last)| {
            let mut m = Vec::new();
            if let Some(s) = system {
                m.push(Message::new("system", s));
            }
            for (u, a) in turns {
                m.push(Message::new("user", u));
                m.push(Message::new("assistant", a));
            }
            m.push(Message::new("user", last));
            m
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, rng_seed: RngSeed::Fixed(20261203), ..ProptestConfig::default() })]

    /// prompt ids are a prefix of prompt+completion ids; the pair equals the template-rendered,
    /// tokenized sequences cut to max_length; truncation never exceeds max_length; the collated
    /// masks cover exactly the completion.
    #[test]
    fn tokenized_pairs_and_masks(prompt in conversation(), chosen in content(), rejected in content(), max_length in 4usize..200) {
        prop_assume!(chosen != rejected);
        let tok = small_tokenizer(true);
        let tmpl = ChatTemplate::new(tok.chat_template.as_deref().unwrap(), None, None).unwrap();
        let ex = chat_example(prompt.clone(), &chosen, &rejected);
        let pt = PairTokenizer::new(&tok, None, TokenizeOptions { max_length: Some(max_length), max_prompt_length: None }).unwrap();
        let mut report = Default::default();
        let got = pt.tokenize(&ex, Path::new("t"), &mut report).unwrap();

        let prompt_ids = encode(&tok, &tmpl.render(&prompt, true).unwrap());
        let full = |answer: &str| {
            let mut m = prompt.clone();
            m.push(Message::new("assistant", answer));
            encode(&tok, &tmpl.render(&m, false).unwrap())
        };
        let (full_c, full_r) = (full(&chosen), full(&rejected));
        let cut = |f: &[u32]| f[..f.len().min(max_length)].to_vec();
        prop_assert_eq!(&full_c[..prompt_ids.len()], &prompt_ids[..], "prompt ids not a prefix");
        prop_assert_eq!(&full_r[..prompt_ids.len()], &prompt_ids[..], "prompt ids not a prefix");
        prop_assert_eq!(report.prompt_mismatch.count, 0);
        match got {
            None if prompt_ids.len() >= max_length => {
                prop_assert_eq!(report.skipped_for(SkipReason::PromptTooLong), 1);
            }
            None => {
                // the only other drop: chosen and rejected equal once cut to max_length
                prop_assert_eq!(cut(&full_c), cut(&full_r), "dropped, but the cut pair differs");
                prop_assert_eq!(report.skipped_for(SkipReason::IdenticalAfterTruncation), 1);
            }
            Some(t) => {
                prop_assert!(t.chosen_len() <= max_length && t.rejected_len() <= max_length);
                prop_assert_eq!(&t.prompt_ids, &prompt_ids);
                prop_assert_eq!(t.chosen_input_ids(), cut(&full_c));
                prop_assert_eq!(t.rejected_input_ids(), cut(&full_r));
                let other = chat_example(vec![Message::new("user", "x")], "y", "z");
                let o = pt.tokenize(&other, Path::new("t"), &mut report).unwrap();
                let pairs: Vec<_> = std::iter::once(&t).chain(o.as_ref()).collect();
                let h = collate_host(&pairs, 0).unwrap();
                let p = pairs.len();
                for (row, (pair, completion)) in pairs.iter().map(|q| (q, &q.chosen_ids)).chain(pairs.iter().map(|q| (q, &q.rejected_ids))).enumerate() {
                    let np = pair.prompt_ids.len();
                    for c in 0..h.seq_len {
                        let i = row * h.seq_len + c;
                        let in_completion = c >= np && c < np + completion.len();
                        prop_assert_eq!(h.completion_mask[i], if in_completion { 1.0 } else { 0.0 }, "row {} col {}", row, c);
                        prop_assert_eq!(h.attention_mask[i], u32::from(c < np + completion.len()));
                    }
                }
                prop_assert_eq!(h.rows, 2 * p);
            }
        }
    }

    /// Plain-text rows: prompt ids are a prefix and the completion is the rest, EOS included.
    #[test]
    fn text_pairs_split_at_the_prompt(prompt in content(), chosen in content(), rejected in content(), max_length in 2usize..120) {
        prop_assume!(chosen != rejected);
        let tok = small_tokenizer(false);
        let ex = PreferenceExample { line: 1, pair: Pair::Text { prompt: prompt.clone(), chosen: chosen.clone(), rejected: rejected.clone() } };
        let pt = PairTokenizer::new(&tok, None, TokenizeOptions { max_length: Some(max_length), max_prompt_length: None }).unwrap();
        let mut report = Default::default();
        if let Some(t) = pt.tokenize(&ex, Path::new("t"), &mut report).unwrap() {
            prop_assert!(t.chosen_len() <= max_length && t.rejected_len() <= max_length);
            let full = encode(&tok, &format!("{prompt}{chosen}<|im_end|>"));
            prop_assert_eq!(t.chosen_input_ids(), full[..full.len().min(max_length)].to_vec());
            let full_r = encode(&tok, &format!("{prompt}{rejected}<|im_end|>"));
            let p = encode(&tok, &prompt);
            // the prompt is the common prefix; byte-level BPE may merge across the boundary,
            // which is counted
            prop_assert_eq!(report.prompt_mismatch.count > 0, !full.starts_with(&p) || !full_r.starts_with(&p));
            prop_assert!(full.starts_with(&t.prompt_ids) && full_r.starts_with(&t.prompt_ids));
        }
    }
}

// ---------------------------------------------------------------- the real SmolLM2 tokenizer

fn smollm2_tokenizer() -> Tokenizer {
    let gguf = common::smollm2_gguf();
    ropo::model::load_parts(gguf.to_str().unwrap(), &Default::default()).unwrap().tokenizer
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// ../shared/golden/smollm2_golden.json `orca_pairs`: TRL 1.16's tokenization of the first
/// three orca validation rows whose prompt is shorter than 256 tokens (rows 0, 1, 3), with
/// max_length 256 keep-start truncation (`orca_pairs_procedure`). Ours must be identical.
#[test]
fn golden_orca_pairs_tokenize_exactly_as_trl() {
    let golden = common::golden("smollm2_golden.json");
    let tok = smollm2_tokenizer();
    assert_eq!(tok.chat_template.as_deref(), golden["chat_template"]["template"].as_str());
    let path = common::shared("data/orca_dpo_pairs/validation.jsonl");
    let data = load(&path, &LoadOptions::default()).unwrap();
    let pt = PairTokenizer::new(&tok, None, TokenizeOptions { max_length: Some(256), max_prompt_length: None }).unwrap();
    let mut report = ropo::data::DataReport::default();
    let pairs = pt.tokenize_all(&data.examples[..4], &path, &mut report).unwrap();
    // row 2 (line 3) has a prompt of >= 256 tokens: dropped and counted, as TRL drops it
    assert_eq!(report.skipped[&SkipReason::PromptTooLong].first_lines, vec![3]);
    assert_eq!(report.prompt_mismatch.count, 0);
    let gold = golden["orca_pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), gold.len());
    for (t, g) in pairs.iter().zip(gold) {
        let row = g["row"].as_u64().unwrap() as usize;
        assert_eq!(t.line, row + 1);
        assert_eq!(t.prompt_ids, ids(&g["prompt_ids"]), "row {row} prompt_ids");
        assert_eq!(t.prompt_ids.len(), g["n_prompt"].as_u64().unwrap() as usize);
        for (side, completion, full) in [("chosen", &t.chosen_ids, t.chosen_input_ids()), ("rejected", &t.rejected_ids, t.rejected_input_ids())] {
            let gs = &g[side];
            assert_eq!(full, ids(&gs["input_ids_truncated"]), "row {row} {side} input_ids_truncated");
            assert_eq!(full.len(), gs["n_total_truncated"].as_u64().unwrap() as usize);
            assert_eq!(completion.len(), gs["n_completion_tokens_scored"].as_u64().unwrap() as usize, "row {row} {side}");
        }
        // untruncated completion lengths, and the <|im_end|>\n tail
        let e = pt.encode(&data.examples[row], &path).unwrap().unwrap();
        assert_eq!(e.chosen_ids.len(), g["chosen"]["completion_ids_untruncated_n"].as_u64().unwrap() as usize);
        assert_eq!(e.rejected_ids.len(), g["rejected"]["completion_ids_untruncated_n"].as_u64().unwrap() as usize);
        assert_eq!(&e.chosen_ids[e.chosen_ids.len() - 2..], &[2, 198]);
        assert_eq!(t.chosen_ids.ends_with(&[2, 198]), g["chosen"]["im_end_included_after_truncation"].as_bool().unwrap());
    }
}

/// The proptest property on real data: with SmolLM2's tokenizer, the prompt ids of every orca
/// and HH pair are a prefix of prompt + answer ids, and no sequence exceeds max_length.
#[test]
fn real_files_tokenize_with_prompt_prefixes_and_limits() {
    let tok = smollm2_tokenizer();
    for (file, max_length) in [("data/orca_dpo_pairs/validation.jsonl", 512), ("data/hh_rlhf_harmless/harmless-base-test.jsonl.gz", 256)] {
        let path = common::shared(file);
        let opts = TokenizeOptions { max_length: Some(max_length), max_prompt_length: None };
        let p = ropo::data::prepare(&path, &tok, None, &LoadOptions::default(), opts).unwrap();
        assert_eq!(p.report.prompt_mismatch.count, 0, "{file}: {}", p.report);
        assert!(p.pairs.iter().all(|t| t.max_len() <= max_length));
        assert!(!p.pairs.is_empty());
        eprintln!("{file}:\n{}", p.report);
        let kept = p.pairs.len() + p.report.total_skipped();
        assert_eq!(kept, p.report.rows_read, "{file}: every row is kept or counted");
    }
}

/// Summed completion log-probs of the golden orca pairs through our batch layout
/// (`[chosen..., rejected...]`, right padding, completion_mask) and the model: within 1e-2 of
/// ../shared/golden/smollm2_golden.json `sum_completion_logprob` (transformers f32 forward;
/// 1e-2 allows f32 accumulation-order differences over ~150 tokens of 30 layers).
#[test]
fn golden_orca_completion_logprobs_through_the_batch_layout() {
    use candle_core::{DType, Device, D};
    let golden = common::golden("smollm2_golden.json");
    let gguf = common::smollm2_gguf();
    let m = ropo::model::load(gguf.to_str().unwrap(), &Default::default()).unwrap();
    let path = common::shared("data/orca_dpo_pairs/validation.jsonl");
    let data = load(&path, &LoadOptions::default()).unwrap();
    let pt = PairTokenizer::new(&m.tokenizer, None, TokenizeOptions { max_length: Some(256), max_prompt_length: None }).unwrap();
    let pairs = pt.tokenize_all(&data.examples[..4], &path, &mut Default::default()).unwrap();
    let refs: Vec<_> = pairs.iter().collect();
    let pad = ropo::data::batch::pad_id(&m.tokenizer).unwrap();
    let b = ropo::data::batch::collate(&refs, pad, &Device::Cpu).unwrap();
    let logits = m.model.forward(&b.input_ids, Some(&b.attention_mask), false).unwrap(); // (2B, T, V)
    let (n, t, _) = logits.dims3().unwrap();
    // logp(seq) = sum_t completion_mask[t] * log_softmax(logits[t-1])[input_ids[t]]
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1).unwrap().contiguous().unwrap(), D::Minus1).unwrap();
    let next = b.input_ids.narrow(1, 1, t - 1).unwrap().contiguous().unwrap().unsqueeze(2).unwrap();
    let tok_logp = logp.gather(&next, 2).unwrap().squeeze(2).unwrap(); // (2B, T-1)
    let mask = b.completion_mask.narrow(1, 1, t - 1).unwrap().contiguous().unwrap();
    let sums = (tok_logp * mask).unwrap().to_dtype(DType::F64).unwrap().sum(1).unwrap().to_vec1::<f64>().unwrap();
    let gold = golden["orca_pairs"].as_array().unwrap();
    let want: Vec<f64> = gold.iter().map(|g| g["chosen"]["sum_completion_logprob"].as_f64().unwrap())
        .chain(gold.iter().map(|g| g["rejected"]["sum_completion_logprob"].as_f64().unwrap())).collect();
    assert_eq!(n, want.len());
    for (i, (got, want)) in sums.iter().zip(&want).enumerate() {
        eprintln!("sequence {i}: ours {got:.5}, golden {want:.5}, diff {:.2e}", (got - want).abs());
        assert!((got - want).abs() < 1e-2, "sequence {i}: ours {got}, golden {want}");
    }
}

// ---------------------------------------------------------------- `ropo data inspect`

fn ropo(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ropo")).args(args).output().expect("running ropo")
}

#[test]
fn cli_inspect_reports_format_drops_percentiles_and_an_example() {
    let gguf = common::smollm2_gguf();
    let orca = common::shared("data/orca_dpo_pairs/validation.jsonl");
    let out = ropo(&["data", "inspect", orca.to_str().unwrap(), "--model", gguf.to_str().unwrap(), "--max-length", "256"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in ["format: openai", "rows read: 284", "prompt alone reaches max_length:", "token lengths before truncation:", "  prompt    p50", "\u{27ea}|\u{27eb}Step 1: Identify"] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn cli_inspect_bad_file_exits_2_naming_file_line_and_field() {
    let gguf = common::smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, format!("{GOOD}\n{{\"prompt\": \"p\", \"chosen\": \"a\"}}\n")).unwrap();
    let out = ropo(&["data", "inspect", path.to_str().unwrap(), "--model", gguf.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "no partial output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end(), format!("ropo: {}:2: missing field \"rejected\"", path.display()));
    let out = ropo(&["data", "inspect", path.to_str().unwrap(), "--model", gguf.to_str().unwrap(), "--format", "orca"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("should be one of standard, implicit_prompt"), "{}", String::from_utf8_lossy(&out.stderr));
}

//! Preference data: the real shared files, every bad-input case, and tokenization properties.

mod common;

use std::path::Path;

use proptest::prelude::*;
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
    let n_prompt = PairTokenizer::new(&tok, None, TokenizeOptions::default()).unwrap().encode(&ex, Path::new("t")).unwrap().prompt_ids.len();
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
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

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
        prop_assert_eq!(&full_c[..prompt_ids.len()], &prompt_ids[..], "prompt ids not a prefix");
        prop_assert_eq!(&full_r[..prompt_ids.len()], &prompt_ids[..], "prompt ids not a prefix");
        prop_assert_eq!(report.prompt_mismatch.count, 0);
        match got {
            None => {
                prop_assert!(prompt_ids.len() >= max_length);
                prop_assert_eq!(report.skipped_for(SkipReason::PromptTooLong), 1);
            }
            Some(t) => {
                prop_assert!(t.chosen_len() <= max_length && t.rejected_len() <= max_length);
                prop_assert_eq!(&t.prompt_ids, &prompt_ids);
                prop_assert_eq!(t.chosen_input_ids(), full_c[..full_c.len().min(max_length)].to_vec());
                prop_assert_eq!(t.rejected_input_ids(), full_r[..full_r.len().min(max_length)].to_vec());
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

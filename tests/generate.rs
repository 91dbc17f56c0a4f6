//! `ropo generate` end to end, running the built binary: greedy chat generation on the real
//! model answers "Paris"; bad inputs exit non-zero with `ropo: ...` and no panic.

mod common;

use std::process::{Command, Output};

fn ropo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ropo")).args(args).output().expect("running ropo")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn greedy_chat_answers_paris() {
    let gguf = common::smollm2_gguf();
    let o = ropo(&["generate", "--model", gguf.to_str().unwrap(), "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "20"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    // transformers' greedy decode of the same prompt: "The capital of France is Paris.<|im_end|>"
    assert_eq!(out.trim_end(), "The capital of France is Paris.", "{out:?}");
}

#[test]
fn library_generation_is_seeded_and_stops_at_eos() {
    use ropo::generate::{generate, GenerateOptions, StopReason};
    let lm = ropo::model::load(common::smollm2_gguf().to_str().unwrap(), &Default::default()).unwrap();
    let g = common::golden("smollm2_golden.json");
    let tmpl = lm.tokenizer.chat_template.as_deref().unwrap();
    let t = ropo::data::template::ChatTemplate::new(tmpl, None, None).unwrap();
    let msgs: Vec<ropo::data::template::Message> = serde_json::from_value(g["chat_template"]["messages_no_system"].clone()).unwrap();
    let prompt = t.render(&msgs, true).unwrap();
    let ids = lm.tokenizer.inner.encode(prompt, false).unwrap().get_ids().to_vec();
    let greedy = generate(&lm.model, &lm.tokenizer, &ids, &GenerateOptions { max_new_tokens: 20, ..Default::default() }, false).unwrap();
    assert_eq!(greedy.stop, StopReason::Eos);
    assert_eq!(greedy.ids.last(), Some(&2), "ends with <|im_end|>");
    assert_eq!(greedy.text, "The capital of France is Paris.");
    let opts = GenerateOptions { max_new_tokens: 12, temperature: 0.9, top_p: 0.9, seed: 5 };
    let a = generate(&lm.model, &lm.tokenizer, &ids, &opts, false).unwrap();
    let b = generate(&lm.model, &lm.tokenizer, &ids, &opts, false).unwrap();
    assert_eq!(a, b, "same seed, same sample");
}

#[test]
fn bad_inputs_exit_nonzero_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("absent.gguf");
    let o = ropo(&["generate", "--model", missing.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.starts_with("ropo: ") && e.contains("absent.gguf") && e.contains("no such file"), "{e}");

    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &std::fs::read(common::smollm2_gguf()).unwrap()[..5000]).unwrap();
    let o = ropo(&["generate", "--model", cut.to_str().unwrap(), "--prompt", "hi"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.starts_with("ropo: ") && e.contains("cut.gguf") && e.contains("truncated or corrupt") && !e.contains("panicked"), "{e}");

    let o = ropo(&["generate", "--model", missing.to_str().unwrap(), "--prompt", "hi", "--top-p", "0"]);
    assert!(stderr(&o).contains("top_p must be in (0, 1]"), "{}", stderr(&o));

    let o = ropo(&["generate", "--model", "x", "--adapter", "ad", "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--adapter ad") && stderr(&o).contains("ad/adapter_config.json"), "{}", stderr(&o));
}

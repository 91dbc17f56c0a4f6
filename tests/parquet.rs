//! Parquet preference files and Hub datasets: fixtures written by pyarrow
//! (`scripts/make_parquet_fixtures.py`, from the shared JSONL data) read like their JSONL twins,
//! and a dataset repo in the hub cache's on-disk layout read offline.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ropo::data::tokenize::TokenizeOptions;
use ropo::data::{load, load_spec, Format, LoadOptions};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet").join(rel)
}

fn tokenizer() -> ropo::model::tokenizer::Tokenizer {
    ropo::model::load_parts(common::smollm2_gguf().to_str().unwrap(), &Default::default()).unwrap().tokenizer
}

/// Same rows, same format, same pairs, same token ids as the JSONL twin.
fn assert_same_as_twin(parquet: &Path, jsonl: &Path, tok: &ropo::model::tokenizer::Tokenizer) -> usize {
    let (p, j) = (load(parquet, &LoadOptions::default()).unwrap(), load(jsonl, &LoadOptions::default()).unwrap());
    assert_eq!(p.format, j.format, "{}", parquet.display());
    assert_eq!(p.report.rows_read, j.report.rows_read);
    assert_eq!(p.examples, j.examples, "{}", parquet.display());
    let opts = TokenizeOptions { max_length: Some(512), max_prompt_length: None };
    let pp = ropo::data::prepare(parquet, tok, None, &LoadOptions::default(), opts).unwrap();
    let jp = ropo::data::prepare(jsonl, tok, None, &LoadOptions::default(), opts).unwrap();
    assert_eq!(pp.pairs.len(), jp.pairs.len());
    for (a, b) in pp.pairs.iter().zip(&jp.pairs) {
        assert_eq!((&a.prompt_ids, &a.chosen_ids, &a.rejected_ids), (&b.prompt_ids, &b.chosen_ids, &b.rejected_ids));
    }
    assert!(!pp.pairs.is_empty());
    p.report.rows_read
}

#[test]
fn every_row_format_reads_from_parquet_as_from_jsonl() {
    let tok = tokenizer();
    let cases = [
        ("standard", Format::Standard),
        ("implicit_prompt", Format::ImplicitPrompt),
        ("conversational", Format::Conversational),
        ("openai", Format::Openai),
        ("hh", Format::Hh),
        ("sharegpt", Format::Sharegpt),
        // LLaMA-Factory's and axolotl's layouts: nested lists (alpaca's history), a struct
        // answer (chat_template), lists of structs with numbers (nectar's ranked answers)
        ("alpaca", Format::Alpaca),
        ("chat_template", Format::ChatTemplate),
        ("axolotl_argilla", Format::AxolotlArgilla),
        ("axolotl_icr", Format::AxolotlIcr),
        ("axolotl_intel", Format::AxolotlIntel),
        ("axolotl_ultra", Format::AxolotlUltra),
        ("axolotl_nectar", Format::AxolotlNectar),
    ];
    for (name, format) in cases {
        let parquet = fixture(&format!("{name}.parquet"));
        assert_eq!(load(&parquet, &LoadOptions::default()).unwrap().format, format, "{name}");
        assert_eq!(assert_same_as_twin(&parquet, &fixture(&format!("{name}.jsonl")), &tok), 8, "{name}");
    }
}

#[test]
fn a_file_of_several_row_groups_reads_every_row_in_order() {
    let tok = tokenizer();
    assert_eq!(assert_same_as_twin(&fixture("multi_group.parquet"), &fixture("multi_group.jsonl"), &tok), 20);
    // rows are numbered through the file: 20 rows in groups of 6
    let got = load(fixture("multi_group.parquet"), &LoadOptions::default()).unwrap();
    assert_eq!(got.examples.iter().map(|e| e.line).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    let mut at = Vec::new();
    ropo::data::parquet::for_each_row(&fixture("multi_group.parquet"), |a, _| {
        at.push((a.row, a.group, a.in_group));
        Ok(())
    })
    .unwrap();
    assert_eq!((at[5], at[6], at[19]), ((6, 0, 6), (7, 1, 1), (20, 3, 2)));
}

#[test]
fn errors_name_the_row_group_row_and_column() {
    let e = load(fixture("bad_type.parquet"), &LoadOptions::default()).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "bad_type.parquet: row 1 (row group 0, row 1): field \"chosen\": expected a string, got a number (Parquet \
             column \"chosen\" has type Int64)"
        ),
        "{e}"
    );
    // a later row group: the standard rows forced to read as conversational
    let forced = LoadOptions { format: Some(Format::Conversational), ..Default::default() };
    let e = load(fixture("multi_group.parquet"), &forced).unwrap_err().to_string();
    assert!(e.contains("multi_group.parquet: row 1 (row group 0, row 1): field \"prompt\""), "{e}");
    // not Parquet at all
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("x.parquet");
    std::fs::write(&fake, b"{\"prompt\": \"p\"}\n").unwrap();
    let e = load(&fake, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: not a readable Parquet file", fake.display())), "{e}");
}

#[test]
fn a_glob_of_shards_reads_them_in_path_order() {
    let spec = format!("{}/train-*.parquet", fixture("hub/data").display());
    let got = load_spec(&spec, "train", &LoadOptions::default()).unwrap();
    let twins: Vec<_> = ["train-00000-of-00002", "train-00001-of-00002"]
        .iter()
        .flat_map(|s| load(fixture(&format!("hub_twins/{s}.jsonl")), &LoadOptions::default()).unwrap().examples)
        .collect();
    assert_eq!(got.examples.len(), 14);
    assert_eq!(got.examples, twins);
    assert_eq!(got.report.rows_read, 14);
}

// ---------------------------------------------------------------- Hub datasets, offline

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub cache holding dataset `ropo-test/prefs` at `main` as the hub client lays it out:
/// `datasets--ropo-test--prefs/{refs/main, blobs/<hash>, snapshots/<commit>/<path> -> blob}`.
fn hub_cache() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--ropo-test--prefs");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    let snap = repo.join("snapshots").join(COMMIT);
    let mut files: Vec<String> = std::fs::read_dir(fixture("hub/data")).unwrap().map(|e| format!("data/{}", e.unwrap().file_name().to_string_lossy())).collect();
    files.push("README.md".into());
    for (i, f) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("{i:040x}"));
        if f == "README.md" {
            std::fs::write(&blob, "---\nlicense: mit\n---\n").unwrap();
        } else {
            std::fs::copy(fixture(&format!("hub/{f}")), &blob).unwrap();
        }
        let link = snap.join(f);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
    }
    cache
}

fn ropo_offline(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ropo")).args(args).env("HF_HUB_CACHE", cache).env("HF_HUB_OFFLINE", "1").output().expect("running ropo")
}

#[test]
fn hub_dataset_splits_resolve_offline_from_the_cache() {
    let cache = hub_cache();
    let settings = ropo::model::hub::HubSettings { cache_dir: cache.path().to_path_buf(), offline: true };
    let d = ropo::data::hub::DatasetRef::parse("hf://datasets/ropo-test/prefs").unwrap().unwrap();
    let train = ropo::data::hub::resolve(&d, "train", &settings).unwrap();
    let names: Vec<String> = train.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]);
    assert_eq!(ropo::data::hub::resolve(&d, "test", &settings).unwrap().len(), 1);
    let e = ropo::data::hub::resolve(&d, "validation", &settings).unwrap_err().to_string();
    assert!(e.contains("ropo-test/prefs@main") && e.ends_with("no split \"validation\" (splits there: test, train)"), "{e}");
    let missing = ropo::data::hub::DatasetRef::parse("hf://datasets/ropo-test/absent").unwrap().unwrap();
    let e = ropo::data::hub::resolve(&missing, "train", &settings).unwrap_err().to_string();
    assert!(e.contains("hub dataset ropo-test/absent@main") && e.contains("HF_HUB_OFFLINE is set: cache only") && e.ends_with("not in the cache"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let settings = ropo::model::hub::HubSettings { cache_dir: empty.path().to_path_buf(), offline: true };
    let e = ropo::data::hub::resolve(&d, "train", &settings).unwrap_err().to_string();
    assert!(e.ends_with("not in the cache"), "{e}");
    // a revision that is not cached
    let d = ropo::data::hub::DatasetRef::parse("hf://datasets/ropo-test/prefs@v2").unwrap().unwrap();
    let settings = ropo::model::hub::HubSettings { cache_dir: cache.path().to_path_buf(), offline: true };
    assert!(ropo::data::hub::resolve(&d, "train", &settings).unwrap_err().to_string().contains("ropo-test/prefs@v2"));
}

fn run_config(out: &Path, train_files: &str, eval: &str) -> String {
    format!(
        r#"[model]
path_or_id = "{model}"

[data]
train_files = {train_files}
{eval}
max_length = 128

[training]
output_dir = "{out}"
learning_rate = 3e-3
per_device_train_batch_size = 2
per_device_eval_batch_size = 2
max_steps = 3
eval_steps = 3
threads = 1
save_total_limit = 0
"#,
        model = common::smollm2_gguf().display(),
        out = out.display(),
    )
}

/// `ropo train` on `hf://datasets/ropo-test/prefs` (train split, test split for evaluation)
/// writes the same adapter, bit for bit, as on the JSONL twins of the same shards.
#[test]
fn train_on_a_hub_dataset_uses_the_split_rows() {
    let cache = hub_cache();
    let dir = tempfile::tempdir().unwrap();
    let hub_cfg = dir.path().join("hub.toml");
    std::fs::write(&hub_cfg, run_config(&dir.path().join("hub"), r#"["hf://datasets/ropo-test/prefs"]"#, "eval_split_name = \"test\"")).unwrap();
    let twin = |s: &str| fixture(&format!("hub_twins/{s}.jsonl")).display().to_string();
    let local_files = format!("[\"{}\", \"{}\"]", twin("train-00000-of-00002"), twin("train-00001-of-00002"));
    let local_cfg = dir.path().join("local.toml");
    std::fs::write(&local_cfg, run_config(&dir.path().join("local"), &local_files, &format!("eval_file = \"{}\"", twin("test-00000-of-00001")))).unwrap();
    let hub = ropo_offline(cache.path(), &["train", "--config", hub_cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&hub.stderr);
    assert!(hub.status.success(), "{err}");
    // 14 rows in two shards; at max_length 128, 9 prompts alone fill it (counted skips)
    assert!(err.contains("train split: 5 pairs from 14 rows") && err.contains("eval split: 4 pairs from 6 rows"), "{err}");
    let local = ropo_offline(cache.path(), &["train", "--config", local_cfg.to_str().unwrap()]);
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let read = |run: &str| std::fs::read(dir.path().join(run).join("adapter_model.safetensors")).unwrap();
    assert!(read("hub") == read("local"), "the hub run trained on other rows than the JSONL twins");
    let evals = |run: &str| {
        let recs = ropo::metrics::read_records(&dir.path().join(run).join("metrics.jsonl")).unwrap();
        recs.iter().filter_map(|r| r.get("eval/loss").and_then(|v| v.as_f64())).collect::<Vec<_>>()
    };
    assert_eq!(evals("hub"), evals("local"));
    assert_eq!(evals("hub").len(), 2);

    // a missing split and a missing repo fail before the model loads, naming what is missing
    std::fs::write(&hub_cfg, run_config(&dir.path().join("x"), r#"["hf://datasets/ropo-test/prefs"]"#, "split = \"dev\"")).unwrap();
    let o = ropo_offline(cache.path(), &["train", "--config", hub_cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no split \"dev\" (splits there: test, train)"), "{err}");
    std::fs::write(&hub_cfg, run_config(&dir.path().join("x"), r#"["hf://datasets/ropo-test/nope"]"#, "")).unwrap();
    let o = ropo_offline(cache.path(), &["train", "--config", hub_cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("hub dataset ropo-test/nope@main") && err.contains("not in the cache"), "{err}");
    assert!(!dir.path().join("x").exists(), "a failed run left output");
}

#[test]
fn data_inspect_reads_a_hub_split_and_a_parquet_file() {
    let cache = hub_cache();
    let model = common::smollm2_gguf();
    let o = ropo_offline(cache.path(), &["data", "inspect", "hf://datasets/ropo-test/prefs", "--split", "test", "--model", model.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("format: conversational") && out.contains("rows read: 6"), "{out}");
    let p = fixture("openai.parquet");
    let o = ropo_offline(cache.path(), &["data", "inspect", p.to_str().unwrap(), "--model", model.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("format: openai") && out.contains("rows read: 8"), "{out}");
}

/// `split_files` picks the files `datasets` 5.2 itself picks for each split
/// (`scripts/golden_split_files.py`: `get_data_patterns` + `DataFilesDict.from_patterns`).
#[test]
fn split_files_match_the_datasets_library() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub_split_files_golden.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let strings = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<Vec<_>>();
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for case in cases {
        let files = strings(&case["files"]);
        for (split, want) in case["splits"].as_object().unwrap() {
            assert_eq!(ropo::data::hub::split_files(&files, split), strings(want), "split {split} of {files:?}");
        }
    }
}

/// `ropo eval --prefs` takes a glob of Parquet shards and `--prompts` a Parquet prompts file,
/// with the same numbers and generations as their JSONL twins.
#[test]
fn eval_reads_parquet_prefs_and_prompts_as_jsonl() {
    let model = common::smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let run = |prefs: &str, prompts: &str, tag: &str| {
        let (report, gens) = (dir.path().join(format!("{tag}.json")), dir.path().join(format!("{tag}.jsonl")));
        let o = Command::new(env!("CARGO_BIN_EXE_ropo"))
            .args(["eval", "--model", model.to_str().unwrap(), "--prefs", prefs, "--max-length", "128", "--prompts", prompts])
            .args(["--samples", "3", "--max-new-tokens", "4", "--out", report.to_str().unwrap(), "--generations", gens.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
        (report["base"].clone(), std::fs::read_to_string(gens).unwrap())
    };
    let (p_report, p_gens) = run(&format!("{}/*.parquet", fixture("hub/data").display()), fixture("prompts.parquet").to_str().unwrap(), "p");
    let (j_report, j_gens) = run(&format!("{}/*.jsonl", fixture("hub_twins").display()), fixture("prompts.jsonl").to_str().unwrap(), "j");
    assert_eq!(p_report["preference"]["pairs"], 9);
    assert_eq!(p_report, j_report);
    assert_eq!(p_gens.lines().count(), 6); // 3 prompts, greedy and sampled
    assert_eq!(p_gens, j_gens);
}

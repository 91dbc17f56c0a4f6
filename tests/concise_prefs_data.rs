//! The shipped preference set `data/concise_prefs` is exactly what
//! `scripts/make_concise_prefs.py` writes, and passes that script's validation
//! (JSON per line, fields present, no empty strings, chosen != rejected, answers under
//! 80 words, train and eval prompts disjoint).

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn shipped_data_matches_generator() {
    let out = Command::new("python3")
        .arg(Path::new(ROOT).join("scripts/make_concise_prefs.py"))
        .arg("--check")
        .output()
        .expect("running python3 scripts/make_concise_prefs.py --check (is python3 installed?)");
    assert!(
        out.status.success(),
        "data/concise_prefs is out of date or invalid; rerun `python3 scripts/make_concise_prefs.py`:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_data_sizes() {
    for (name, lo, hi) in [("train", 150, 300), ("eval", 40, 100)] {
        let path = Path::new(ROOT).join("data/concise_prefs").join(format!("{name}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let rows = text.lines().filter(|l| !l.trim().is_empty()).count();
        assert!((lo..=hi).contains(&rows), "{}: {rows} rows, expected {lo}..={hi}", path.display());
        assert_eq!(rows, text.lines().count(), "{}: blank lines", path.display());
    }
}

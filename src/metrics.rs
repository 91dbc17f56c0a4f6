//! Training metrics with TRL's names, appended to `metrics.jsonl`, and the progress bar.
//!
//! A record is one JSON object per line with sorted keys (as HF writes `trainer_state.json`):
//! training records hold `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
//! `rewards/margins`, `logps/chosen`, `logps/rejected`, `grad_norm`, `learning_rate`, `epoch`,
//! `step`, `tokens_per_second`, `elapsed_seconds` (and, for a loss list or an `sft` term, each
//! term's mean: `nll_loss`, `loss/<type>`); evaluation records hold the same loss and
//! reward keys prefixed `eval/` (`eval/loss`, `eval/rewards/accuracies`, ...) plus `step`,
//! `epoch`, `eval/tokens_per_second`, `elapsed_seconds`. `tokens_per_second` and
//! `elapsed_seconds` are wall-clock figures: the only keys that differ between two identical runs.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::loss::RewardMetrics;

/// One log record: key → value, keys sorted.
pub type Record = BTreeMap<String, Value>;

/// The keys whose values depend on wall-clock time (excluded when comparing two runs).
pub const TIMING_KEYS: [&str; 3] = ["tokens_per_second", "eval/tokens_per_second", "elapsed_seconds"];

/// What is logged about one optimiser step (batch means over the step's micro-batches).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStats {
    /// Optimiser steps done (1-based after the first update).
    pub step: u64,
    /// Fractional epochs done.
    pub epoch: f64,
    /// The loss that was differentiated.
    pub loss: f64,
    /// TRL's reward metrics.
    pub rewards: RewardMetrics,
    /// Each loss term's mean before its weight (`nll_loss`, `loss/<type>`); empty for a single
    /// pairwise loss (its value is `loss`).
    pub terms: Vec<(&'static str, f64)>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate of this update.
    pub learning_rate: f64,
    /// Real (non-padding) tokens per second over the logging interval.
    pub tokens_per_second: f64,
    /// Seconds since the start of training.
    pub elapsed_seconds: f64,
}

/// What is logged about one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalStats {
    /// The optimiser step it was made at.
    pub step: u64,
    /// Fractional epochs done.
    pub epoch: f64,
    /// Mean loss over the evaluation pairs.
    pub loss: f64,
    /// Reward metrics over the evaluation pairs.
    pub rewards: RewardMetrics,
    /// Each loss term's mean over the evaluation pairs (as [`TrainStats::terms`]).
    pub terms: Vec<(&'static str, f64)>,
    /// The live diagnostics (`drift/kl`, `drift/nll`, `greedy/mean_length`, `greedy/hit_max_new_tokens`:
    /// [`crate::train::diagnostics`]); empty when off.
    pub diagnostics: Vec<(&'static str, f64)>,
    /// Real tokens per second of the evaluation.
    pub tokens_per_second: f64,
    /// Seconds since the start of training.
    pub elapsed_seconds: f64,
}

fn num(x: f64) -> Value {
    // serde_json writes non-finite floats as null; keep that visible rather than failing.
    serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

impl TrainStats {
    /// The record, with TRL's key names.
    pub fn record(&self) -> Record {
        let mut r = Record::new();
        r.insert("loss".into(), num(self.loss));
        for (k, v) in self.rewards.named().into_iter().chain(self.terms.iter().copied()) {
            r.insert(k.into(), num(v));
        }
        r.insert("grad_norm".into(), num(self.grad_norm));
        r.insert("learning_rate".into(), num(self.learning_rate));
        r.insert("epoch".into(), num(self.epoch));
        r.insert("step".into(), Value::from(self.step));
        r.insert("tokens_per_second".into(), num(self.tokens_per_second));
        r.insert("elapsed_seconds".into(), num(self.elapsed_seconds));
        r
    }
}

impl EvalStats {
    /// The record: loss and reward keys prefixed `eval/`.
    pub fn record(&self) -> Record {
        let mut r = Record::new();
        r.insert("eval/loss".into(), num(self.loss));
        for (k, v) in self.rewards.named().into_iter().chain(self.terms.iter().copied()).chain(self.diagnostics.iter().copied()) {
            r.insert(format!("eval/{k}"), num(v));
        }
        r.insert("epoch".into(), num(self.epoch));
        r.insert("step".into(), Value::from(self.step));
        r.insert("eval/tokens_per_second".into(), num(self.tokens_per_second));
        r.insert("elapsed_seconds".into(), num(self.elapsed_seconds));
        r
    }
}

/// Appends records to `metrics.jsonl`, one JSON object per line, each written through to the
/// file as soon as it is logged (a killed run keeps every record it logged).
#[derive(Debug)]
pub struct MetricsLogger {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLogger {
    /// Start a new `path` (an existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(|e| Error::input(path, None, format!("creating metrics file: {e}")))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Continue `path` after resuming from a checkpoint at `step`: records of later steps (logged
    /// by the interrupted run after its last checkpoint) are dropped first, atomically, so the
    /// file ends up as an uninterrupted run's. A missing file starts empty.
    ///
    /// The kept lines are copied byte for byte, never parsed and re-serialised: a float that went
    /// through a parse and a write could come back different in its last bit (serde_json's
    /// default parser is not correctly rounded), and the file would no longer be the
    /// uninterrupted run's. A last line without its newline (cut short by a kill during the
    /// write) that does not parse is dropped; any other malformed line is an error naming the
    /// file and line.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let old = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::input(path, None, format!("reading metrics file: {e}"))),
        };
        let mut text = String::new();
        for (i, line) in old.split_inclusive('\n').enumerate() {
            let complete = line.ends_with('\n');
            let body = line.trim_end_matches(['\n', '\r']);
            if body.trim().is_empty() {
                continue;
            }
            let rec: Record = match serde_json::from_str(body) {
                Ok(r) => r,
                Err(_) if !complete => break, // the last line, half-written when the run was killed
                Err(e) => return Err(Error::input(path, Some(i + 1), e.to_string())),
            };
            if rec.get("step").and_then(Value::as_u64).is_some_and(|s| s <= step) {
                text.push_str(body);
                text.push('\n');
            }
        }
        crate::fsutil::write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::input(path, None, format!("opening metrics file: {e}")))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Append one record (one line) and flush it to the file.
    pub fn log(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| Error::Msg(e.to_string()))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::input(&self.path, None, format!("writing metrics: {e}")))
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Read every record of a `metrics.jsonl`; errors name the file and line.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let f = std::fs::File::open(path).map_err(|e| Error::input(path, None, e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::input(path, Some(i + 1), e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| Error::input(path, Some(i + 1), e.to_string()))?);
    }
    Ok(out)
}

/// A record without its wall-clock keys ([`TIMING_KEYS`]), for comparing runs.
pub fn without_timing(r: &Record) -> Record {
    r.iter().filter(|(k, _)| !TIMING_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The progress bar: `step 12/100 [=====>    ] loss 0.6812 acc 0.62 margin 0.041 | 310 tok/s`.
///
/// Hidden when stderr is not a terminal or `CI` is set (the records still go to `metrics.jsonl`).
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total_steps`, starting at `start_step` (after a resume).
    pub fn new(total_steps: u64, start_step: u64) -> Self {
        let visible = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("CI").is_none();
        Self::with_target(total_steps, start_step, if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() })
    }

    /// A bar that never draws (tests, `--quiet`).
    pub fn hidden(total_steps: u64, start_step: u64) -> Self {
        Self::with_target(total_steps, start_step, ProgressDrawTarget::hidden())
    }

    fn with_target(total_steps: u64, start_step: u64, target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total_steps), target);
        bar.set_style(
            ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} [{elapsed_precise}<{eta_precise}]")
                .expect("a valid progress template")
                .progress_chars("=> "),
        );
        bar.set_position(start_step);
        Self { bar }
    }

    /// Show step `step` with the latest loss, reward accuracy, reward margin and throughput.
    pub fn update(&self, step: u64, loss: f64, accuracy: f64, margin: f64, tokens_per_second: f64) {
        self.bar.set_position(step);
        self.bar.set_message(Self::message(loss, accuracy, margin, tokens_per_second));
    }

    /// The message part of the bar.
    pub fn message(loss: f64, accuracy: f64, margin: f64, tokens_per_second: f64) -> String {
        format!("loss {loss:.4} acc {accuracy:.2} margin {margin:.3} | {tokens_per_second:.0} tok/s")
    }

    /// Print a line above the bar (or to stderr when hidden).
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Whether the bar draws.
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Leave the bar as it is (final state).
    pub fn finish(&self) {
        self.bar.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(step: u64) -> TrainStats {
        TrainStats {
            step,
            epoch: step as f64 / 100.0,
            loss: std::f64::consts::LN_2,
            rewards: RewardMetrics { rewards_accuracies: 0.5, logps_chosen: -255.75, ..Default::default() },
            terms: vec![],
            grad_norm: 4.32,
            learning_rate: 5e-5,
            tokens_per_second: 123.4,
            elapsed_seconds: 1.5,
        }
    }

    #[test]
    fn train_record_has_trl_keys() {
        let r = stats(3).record();
        let keys: Vec<&str> = r.keys().map(|k| k.as_str()).collect();
        let mut want = vec![
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/ties",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "grad_norm",
            "learning_rate",
            "epoch",
            "step",
            "tokens_per_second",
            "elapsed_seconds",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(r["step"], Value::from(3u64));
        assert_eq!(r["logps/chosen"].as_f64(), Some(-255.75));
        let e = EvalStats { step: 3, epoch: 0.03, loss: 0.5, rewards: RewardMetrics::default(), terms: vec![], diagnostics: vec![], tokens_per_second: 1.0, elapsed_seconds: 2.0 }.record();
        for k in ["eval/loss", "eval/rewards/accuracies", "eval/rewards/ties", "eval/rewards/margins", "eval/logps/rejected", "step", "epoch"] {
            assert!(e.contains_key(k), "eval record lacks {k}");
        }
        assert!(!e.contains_key("loss"));
        let nan = TrainStats { loss: f64::NAN, ..stats(1) }.record();
        assert_eq!(nan["loss"], Value::Null);
    }

    // Each record is on disk as soon as log() returns; resume drops the records logged after the
    // checkpoint, so a killed-and-resumed run writes the same lines as an uninterrupted one.
    #[test]
    fn logger_appends_flushes_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLogger::create(&path).unwrap();
        for s in 1..=5 {
            log.log(&stats(s).record()).unwrap();
            assert_eq!(read_records(&path).unwrap().len() as u64, s, "record {s} not on disk");
        }
        drop(log);
        let mut log = MetricsLogger::resume(&path, 3).unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 3);
        log.log(&stats(4).record()).unwrap();
        let recs = read_records(&path).unwrap();
        let steps: Vec<u64> = recs.iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert_eq!(without_timing(&recs[3]), without_timing(&stats(4).record()));
        assert!(!without_timing(&recs[0]).contains_key("elapsed_seconds"));
        // resume with no file starts empty
        let fresh = dir.path().join("none.jsonl");
        MetricsLogger::resume(&fresh, 10).unwrap();
        assert!(read_records(&fresh).unwrap().is_empty());
        // a corrupt line names file and line
        std::fs::write(&path, "{\"step\": 1}\nnot json\n").unwrap();
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
        // an unwritable location is an error naming it
        let e = MetricsLogger::create(&dir.path().join("missing/metrics.jsonl")).unwrap_err().to_string();
        assert!(e.contains("missing/metrics.jsonl"), "{e}");
    }

    // Values whose shortest decimal form serde_json's default (fast, not correctly rounded)
    // float parser reads 1 ulp off: 0x3e89999999999998 is step 2's `rewards/margins` of the
    // SIGKILL-resume test in tests/train.rs, which came back from a resume as ...99a.
    const HARD_BITS: [u64; 5] = [0x3e89999999999998, 0x3e89999999999999, 0x3fffdc4b513c5963, 0xbe440c1900998352, 0xbf2b4ddee1b5f683];

    // Reading a record gives back the exact f64 that was logged, bit for bit (needs serde_json's
    // `float_roundtrip` feature; without it ~1 in 6 17-digit values come back 1 ulp off).
    #[test]
    fn records_read_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLogger::create(&path).unwrap();
        for (i, bits) in HARD_BITS.iter().enumerate() {
            let x = f64::from_bits(*bits);
            log.log(&TrainStats { rewards: RewardMetrics { rewards_margins: x, ..Default::default() }, ..stats(i as u64 + 1) }.record()).unwrap();
        }
        for (r, bits) in read_records(&path).unwrap().iter().zip(HARD_BITS) {
            let got = r["rewards/margins"].as_f64().unwrap();
            assert_eq!(got.to_bits(), bits, "{} read back as {got:e}", f64::from_bits(bits));
        }
    }

    // Resuming keeps the lines of the steps up to the checkpoint byte for byte (they are never
    // parsed and re-written), so a killed-and-resumed metrics.jsonl is the uninterrupted one.
    #[test]
    fn resume_keeps_the_kept_lines_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLogger::create(&path).unwrap();
        for (i, bits) in HARD_BITS.iter().enumerate() {
            let x = f64::from_bits(*bits);
            log.log(&TrainStats { loss: x, rewards: RewardMetrics { rewards_margins: x, ..Default::default() }, ..stats(i as u64 + 1) }.record()).unwrap();
        }
        drop(log);
        let before = std::fs::read_to_string(&path).unwrap();
        let first3: String = before.lines().take(3).map(|l| format!("{l}\n")).collect();
        MetricsLogger::resume(&path, 3).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first3);
        // a last line cut short by the kill (no newline) is dropped, not kept half-written
        std::fs::write(&path, format!("{first3}{{\"step\": 4, \"loss\": 0.")).unwrap();
        MetricsLogger::resume(&path, 3).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first3);
    }

    #[test]
    fn progress_message_and_hidden_bar() {
        assert_eq!(Progress::message(0.6812, 0.625, 0.0412, 310.4), "loss 0.6812 acc 0.62 margin 0.041 | 310 tok/s");
        let p = Progress::hidden(10, 2);
        assert!(p.is_hidden());
        p.update(3, 0.69, 0.5, 0.0, 100.0);
        p.finish();
    }
}

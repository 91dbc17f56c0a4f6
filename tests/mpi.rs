//! Data-parallel `ropo train` over MPI (built with `--features mpi`; `.ci/run` installs Open MPI
//! and runs this file): `mpirun -np 2` (one thread a rank) on the real model against one process
//! with the same global batch, bit for bit; a kill after a checkpoint and `--resume` with the
//! other rank count; a rank with another config refused before training.
//!
//! Same global batch: 2 ranks x `gradient_accumulation_steps = 1` x 2 pairs against 1 process x
//! `gradient_accumulation_steps = 2` x 2 pairs. Compared: the adapter file's bytes, the
//! optimiser state's bytes, every `metrics.jsonl` record and `trainer_state.json` (timing keys
//! aside: tokens/s and elapsed seconds are measurements, not results).
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ropo::metrics::{read_records, without_timing};

fn repo(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel).to_str().unwrap().to_string()
}

/// A short run: the first 12 concise_prefs train rows, 4 eval rows (2 eval batches: one a rank),
/// 6 steps, checkpoints at 3 and 6, evaluations at 0, 3 and 6, one thread.
fn config(out: &Path, accumulation: usize, extra: &str) -> String {
    format!(
        r#"[model]
path_or_id = "{model}"

[data]
train_files = ["{train}"]
eval_file = "{eval}"
train_rows = ":12"
eval_rows = ":4"
max_length = 96

[training]
output_dir = "{out}"
learning_rate = 3e-3
per_device_train_batch_size = 2
gradient_accumulation_steps = {accumulation}
per_device_eval_batch_size = 2
threads = 1
max_steps = 6
save_steps = 3
eval_steps = 3
save_total_limit = 0
lr_scheduler_type = "cosine"
warmup_steps = 2
{extra}
"#,
        model = common::smollm2_gguf().display(),
        train = repo("data/concise_prefs/train.jsonl"),
        eval = repo("data/concise_prefs/eval.jsonl"),
        out = out.display(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `mpirun` with what a container and a root user need: run as root allowed (CI is root), no
/// core binding (the test sets one thread a rank), shared-memory transport without the
/// cross-memory-attach copy (refused in many containers).
fn mpirun(np: &[(usize, &Path)], extra_args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,vader", "--mca", "btl_vader_single_copy_mechanism", "none"]);
    for (k, (n, cfg)) in np.iter().enumerate() {
        if k > 0 {
            c.arg(":");
        }
        c.args(["-np", &n.to_string(), env!("CARGO_BIN_EXE_ropo"), "train", "--config", cfg.to_str().unwrap()]);
        c.args(extra_args);
    }
    c
}

fn ropo_train(cfg: &Path, extra_args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ropo"));
    c.args(["train", "--config", cfg.to_str().unwrap()]).args(extra_args);
    c
}

fn run(mut c: Command) -> Output {
    let o = c.output().expect("starting the run (is Open MPI installed? .ci/run installs it)");
    assert!(o.status.success(), "exit {:?}\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
    o
}

fn bytes(d: &Path, f: &str) -> Vec<u8> {
    std::fs::read(d.join(f)).unwrap_or_else(|e| panic!("{}: {e}", d.join(f).display()))
}

fn metrics(d: &Path) -> Vec<ropo::metrics::Record> {
    read_records(&d.join("metrics.jsonl")).unwrap().iter().map(without_timing).collect()
}

fn trainer_state(d: &Path) -> String {
    let mut s = ropo::checkpoint::TrainerState::load(&d.join(ropo::checkpoint::TRAINER_STATE_FILE)).unwrap();
    s.log_history = s.log_history.iter().map(without_timing).collect();
    s.to_json().unwrap()
}

fn assert_same_run(a: &Path, b: &Path) {
    assert!(bytes(a, "adapter_model.safetensors") == bytes(b, "adapter_model.safetensors"), "adapter bytes differ");
    for step in [3, 6] {
        let f = format!("checkpoints/step-{step}/optimizer.safetensors");
        assert!(bytes(a, &f) == bytes(b, &f), "optimiser state at step {step} differs");
    }
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), 6 + 3, "6 training records and evaluations at steps 0, 3, 6");
    assert_eq!(ma, mb, "metrics differ");
    assert_eq!(trainer_state(a), trainer_state(b), "trainer_state.json differs");
}

/// Both reference modes: the reference forward every step (default) and the precomputed
/// reference (sharded over the ranks, gathered, cached by rank 0); and a TRL 1.x loss list with
/// LD-DPO (per-term metrics and the unweighted sums travel through the gathers too).
#[test]
fn two_ranks_are_bit_identical_to_one_process_with_the_same_global_batch() {
    let extras = ["", "precompute_ref_log_probs = true", "loss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0, 0.5]\nld_alpha = 0.5"];
    for extra in extras {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        run(ropo_train(&write(dir.path(), "one.toml", &config(&one, 2, extra)), &[]));
        let o = run(mpirun(&[(2, &write(dir.path(), "two.toml", &config(&two, 1, extra)))], &[]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("(2 x 1 accumulation x 2 ranks)") && err.contains("data parallel: 2 ranks; exchange"), "{err}");
        for line in ["ropo train: model", "eval at step 0:", "eval at step 6:", "done: 6 steps"] {
            assert_eq!(err.matches(line).count(), 1, "only rank 0 prints {line:?}: {err}");
        }
        assert_same_run(&one, &two);
    }
}

/// Start `c`, wait for the step-3 checkpoint, stop the job (SIGTERM: mpirun ends its ranks).
fn kill_after_step_3(mut c: Command, out: &Path) {
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let ck = out.join("checkpoints/step-3");
    let t0 = Instant::now();
    while !ck.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its step-3 checkpoint");
        assert!(t0.elapsed() < Duration::from_secs(900), "no step-3 checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
    assert!(!out.join("adapter_model.safetensors").exists(), "the killed run must not have finished");
}

/// 2 ranks killed after the step-3 checkpoint, resumed as 1 process; and 1 process killed,
/// resumed as 2 ranks: each ends as the uninterrupted single-process run, bit for bit.
#[test]
fn a_kill_and_resume_with_another_rank_count_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    run(ropo_train(&write(dir.path(), "full.toml", &config(&full, 2, "")), &[]));

    let a = dir.path().join("two-then-one");
    kill_after_step_3(mpirun(&[(2, &write(dir.path(), "a2.toml", &config(&a, 1, "")))], &[]), &a);
    // one process with accumulation 1 would be another global batch (2 pairs, not 4): refused
    let o = ropo_train(&write(dir.path(), "wrong.toml", &config(&a, 1, "")), &["--resume", a.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("global batch of 4 pairs") && err.contains("gradient_accumulation_steps = 2 gives it"), "{err}");
    let o = run(ropo_train(&write(dir.path(), "a1.toml", &config(&a, 2, "")), &["--resume", a.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("(step 3)"));
    assert_same_run(&full, &a);

    let b = dir.path().join("one-then-two");
    kill_after_step_3(ropo_train(&write(dir.path(), "b1.toml", &config(&b, 2, "")), &[]), &b);
    let b2 = write(dir.path(), "b2.toml", &config(&b, 1, ""));
    let o = run(mpirun(&[(2, &b2)], &["--resume", b.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("(step 3)"));
    assert_same_run(&full, &b);
}

/// Rank 1 with another config (a different beta): every rank refuses before training, the job
/// exits non-zero with a message naming the rank, and no checkpoint or adapter is written.
#[test]
fn a_rank_with_another_config_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let a = write(dir.path(), "a.toml", &config(&out, 1, ""));
    let b = write(dir.path(), "b.toml", &config(&out, 1, "beta = 0.2"));
    let o = mpirun(&[(1, &a), (1, &b)], &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("rank(s) [1] of 2 have a different config"), "{err}");
    assert!(!out.join("checkpoints").exists() && !out.join("adapter_model.safetensors").exists(), "nothing may be written");
}

//! The training loop, top to bottom (nanoGPT style):
//!
//! ```text
//! setup: threads, data rows, model, adapter, tokenization, reference log-probs, output folder
//! for step in start..total_steps {
//!     lr = schedule(step)
//!     for each of gradient_accumulation_steps micro-batches {
//!         policy forward (adapters on) -> completion logps; reference logps (adapters bypassed)
//!         loss (TRL's definition of loss_type) -> backward -> accumulate (1/GA each)
//!     }
//!     clip by global norm; stop on a non-finite loss or norm; AdamW step
//!     log every logging_steps; evaluate every eval_steps; checkpoint every save_steps
//!     Ctrl-C: checkpoint at the end of this step and return
//! }
//! final evaluation, final adapter, trainer_state.json
//! ```
//!
//! Determinism: the same config and seed give bit-identical adapters and metrics (timing keys
//! aside), also across a kill and `--resume`, as long as the thread count is the same: candle's
//! CPU matmuls split their sums across threads, so the float results depend on the count. Set
//! it with `training.threads` (or `RAYON_NUM_THREADS`; see [`configure_threads`]).
//!
//! Every output file is written atomically (temporary sibling, then rename); `metrics.jsonl` is
//! appended one flushed line at a time and cut back to the checkpoint on resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::AnyAdapterSet;
use crate::checkpoint::{self, CheckpointData, CheckpointMeta, DataPosition, RngState, TrainerState};
use crate::config::{ModelDtype, RowSlice, RunConfig, TemplateSource, TrainingSection};
use crate::data::batch::{collate, epoch_batches, pad_id, Batch, SamplerConfig};
use crate::data::tokenize::{PairTokenizer, TokenizeOptions, TokenizedPair};
use crate::data::{DataReport, Format, Loaded, PreferenceExample};
use crate::error::{Error, Result};
use crate::loss::{completion_token_counts, preference_loss, split_pairs, LossOutput, PairLogps, RewardMetrics};
use crate::metrics::{EvalStats, MetricsLogger, Progress, TrainStats};
use crate::model::llama::Model;
use crate::optim::{AdamW, GradAccumulator};
use crate::reference::{self, PairRefLogps};

/// Set by the SIGINT (Ctrl-C) handler that `ropo train` installs; the loop checks it at the end
/// of every optimiser step, writes a checkpoint and returns [`Outcome::Interrupted`]. The only
/// global state of the trainer.
pub static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Name of the resolved config at the top of the output folder.
pub const CONFIG_FILE: &str = "config.toml";
/// Name of the metrics file in the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Folder (in the output folder) of the precomputed reference log-probs.
pub const REFERENCE_DIR: &str = "reference_logps";

/// Configure the number of compute threads (rayon's global pool, which candle's CPU kernels and
/// matmuls use) before any tensor work: `threads > 0` wins; else an existing
/// `RAYON_NUM_THREADS` is respected; else every core. Returns the count in use.
///
/// candle reads `RAYON_NUM_THREADS` itself for its matmul parallelism, so the variable is set
/// to the chosen count too. Also [`single_threaded_elementwise`] (unless `CANDLE_NUM_THREADS`
/// is set) and [`keep_freed_memory`] (the `ropo` binary has already called both, for every
/// subcommand; they are idempotent). Call it once, early, from the main thread (it sets
/// environment variables). A pool already built (a second call in one process) is left as it is.
pub fn configure_threads(threads: usize) -> usize {
    single_threaded_elementwise();
    keep_freed_memory();
    let from_env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.trim().parse::<usize>().ok()).filter(|&n| n > 0);
    let n = if threads > 0 {
        threads
    } else {
        from_env.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    rayon::current_num_threads()
}

/// Run candle's element-wise ops on the calling thread: sets `CANDLE_NUM_THREADS=1` unless the
/// variable is already set (then it is respected). Call before any tensor work (candle reads it
/// once, when it first needs its pool).
///
/// Why: candle 0.11 splits element-wise ops over 64K elements across its own "barrier pool"
/// (`CANDLE_NUM_THREADS - 1` worker threads, default: the core count), separate from the rayon
/// pool its matmuls use. Its workers and the waiting main thread busy-spin (25,000 spins)
/// between ops, so on a machine with as many cores as matmul threads they take the cores from
/// the next matmul: a profile of the training step (benches/step.rs, prefix path, 2 cores)
/// spent 56% of its samples spinning in `BarrierGuard::drop` and the pool's worker loop. The
/// matmuls keep their `RAYON_NUM_THREADS` threads. Results are bit-identical: the pool only
/// splits element-wise maps into ranges (no reduction changes order).
pub fn single_threaded_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Let the allocator keep freed activation buffers for reuse (glibc: `mallopt`; elsewhere a
/// no-op): allocations below 32 MiB come from the heap instead of fresh `mmap`s
/// (`M_MMAP_THRESHOLD`), up to 1 GiB of free heap top is kept instead of returned to the OS
/// (`M_TRIM_THRESHOLD`), and the heap grows 256 MiB at a time (`M_TOP_PAD`).
///
/// Why: a training step allocates and frees thousands of activation and gradient tensors of
/// 0.1-30 MB; with glibc's defaults many of them are fresh pages, each touched page a page
/// fault and a kernel zeroing (`clear_page`): ~8% of the step's samples in a profile
/// (benches/step.rs, prefix path). Measured there: minor page faults per 3-step run 2.2-2.5M ->
/// 0.99M, peak RSS unchanged (3.47 GiB). No effect on any value.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; any value is valid to pass.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// How `run` was asked to start.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in this output folder from its newest complete checkpoint.
    pub resume: Option<PathBuf>,
    /// Draw the progress bar (when stderr is a terminal).
    pub progress: bool,
}

/// How a run ended (errors aside).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every step done; the final adapter is written.
    Finished,
    /// Stopped by Ctrl-C after `step`; a checkpoint is at `checkpoint`.
    Interrupted {
        /// Optimiser steps done.
        step: u64,
        /// The checkpoint folder written.
        checkpoint: PathBuf,
    },
}

/// What `run` reports back.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// How it ended.
    pub outcome: Outcome,
    /// The output folder.
    pub output_dir: PathBuf,
    /// Optimiser steps done.
    pub global_step: u64,
    /// The evaluation before the first step (fresh runs with an eval set).
    pub first_eval: Option<EvalStats>,
    /// The last evaluation.
    pub last_eval: Option<EvalStats>,
    /// Seconds of this process's training loop.
    pub wall_seconds: f64,
    /// Real (non-padding) training tokens per second over this process's steps.
    pub tokens_per_second: f64,
    /// Peak resident set size of the process in KiB (`VmHWM`), when the OS tells.
    pub peak_rss_kib: Option<u64>,
}

/// The process's peak resident set size in KiB (`VmHWM` of `/proc/self/status`; Linux only).
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ------------------------------------------------------------------------------------------
// Adapter: the only adapter-kind-specific calls of the loop
// ------------------------------------------------------------------------------------------

/// Wrap the target linears with fresh adapters of the configured kind (`adapter.type`:
/// RoPO, LoRA or full), recording the base model's path or id in the adapter config.
fn attach_adapter(model: &mut Model, cfg: &RunConfig) -> Result<AnyAdapterSet> {
    AnyAdapterSet::inject(model, &cfg.adapter, &cfg.model.path_or_id)
}

/// Write the adapter files of `set` into `dir` (each file atomically).
fn save_adapter(dir: &Path, set: &AnyAdapterSet) -> Result<()> {
    set.save(dir)
}

// ------------------------------------------------------------------------------------------
// Data
// ------------------------------------------------------------------------------------------

/// Rows read from the data files, before tokenization (no model needed: bad files fail fast).
#[derive(Debug)]
pub struct Rows {
    /// Every file read (train files first, then the eval file), with its load report.
    pub files: Vec<Loaded>,
    /// `(index into files, example)` of the training rows, in file order.
    pub train: Vec<(usize, PreferenceExample)>,
    /// The evaluation rows.
    pub eval: Vec<(usize, PreferenceExample)>,
}

fn slice<T: Clone>(v: &[T], s: Option<RowSlice>) -> Vec<T> {
    match s {
        Some(s) => v[s.resolve(v.len())].to_vec(),
        None => v.to_vec(),
    }
}

/// Read the data files of `cfg` and split the rows.
///
/// Row slices index the usable rows of the concatenated train files (rows dropped while loading,
/// e.g. identical chosen/rejected, are counted and not indexed). Evaluation rows: `eval_file`
/// (sliced by `eval_rows`), else `eval_rows` of the train files, else the last `eval_split`
/// fraction (rounded, at least 1) of the training rows, which are then left out of training.
///
/// Errors: a missing or malformed file (named, with its line), an unknown `data.format`.
pub fn read_rows(cfg: &RunConfig) -> Result<Rows> {
    let d = &cfg.data;
    let format = if d.format == "auto" {
        None
    } else {
        Some(d.format.parse::<Format>().map_err(|e| Error::Config(format!("data.format: {e}")))?)
    };
    let on_identical = match d.on_identical {
        crate::config::OnIdentical::Skip => crate::data::OnIdentical::Skip,
        crate::config::OnIdentical::Error => crate::data::OnIdentical::Error,
    };
    let opts = crate::data::LoadOptions { format, on_identical };
    let mut files = Vec::new();
    let mut all = Vec::new();
    for f in &d.train_files {
        let loaded = crate::data::load(f, &opts)?;
        all.extend(loaded.examples.iter().cloned().map(|e| (files.len(), e)));
        files.push(loaded);
    }
    let (train, eval) = if let Some(ef) = &d.eval_file {
        let loaded = crate::data::load(ef, &opts)?;
        let ev: Vec<_> = loaded.examples.iter().cloned().map(|e| (files.len(), e)).collect();
        files.push(loaded);
        (slice(&all, d.train_rows), slice(&ev, d.eval_rows))
    } else if d.eval_rows.is_some() {
        (slice(&all, d.train_rows), slice(&all, d.eval_rows))
    } else if let Some(frac) = d.eval_split {
        let base = slice(&all, d.train_rows);
        let n_eval = ((base.len() as f64 * frac).round() as usize).clamp(1, base.len().saturating_sub(1).max(1));
        let cut = base.len().saturating_sub(n_eval);
        (base[..cut].to_vec(), base[cut..].to_vec())
    } else {
        (slice(&all, d.train_rows), Vec::new())
    };
    if train.is_empty() {
        let read: usize = files.iter().map(|f| f.report.rows_read).sum();
        let mut why: Vec<String> = Vec::new();
        for f in &files {
            why.extend(f.report.skipped.iter().map(|(reason, c)| format!("{}: {reason}: {c}", f.source.display())));
        }
        let rows = d.train_rows.map(|r| format!(" with data.train_rows = {:?}", String::from(r))).unwrap_or_default();
        let why = if why.is_empty() { String::new() } else { format!("; skipped: {}", why.join(", ")) };
        return Err(Error::Config(format!("no training rows: data.train_files {:?}{rows} select none ({read} rows read{why})", d.train_files)));
    }
    Ok(Rows { files, train, eval })
}

/// Tokenized training and evaluation pairs with their reports.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Training pairs, in file order.
    pub train: Vec<TokenizedPair>,
    /// Evaluation pairs, in file order.
    pub eval: Vec<TokenizedPair>,
    /// Rows of the training split and what tokenization dropped or cut.
    pub train_report: DataReport,
    /// Same for the evaluation split.
    pub eval_report: DataReport,
}

/// The chat template override of `cfg` (file contents or inline source). Errors: unreadable file.
pub fn template_override(cfg: &RunConfig) -> Result<Option<String>> {
    match cfg.data.chat_template_source() {
        None => Ok(None),
        Some(TemplateSource::Inline(s)) => Ok(Some(s)),
        Some(TemplateSource::File(p)) => {
            std::fs::read_to_string(&p).map(Some).map_err(|e| Error::input(&p, None, format!("data.chat_template: {e}")))
        }
    }
}

/// The tokenization settings of `cfg`.
pub fn tokenize_options(cfg: &RunConfig) -> TokenizeOptions {
    TokenizeOptions { max_length: Some(cfg.data.max_length), max_prompt_length: cfg.data.max_prompt_length }
}

fn tokenize_rows(pt: &PairTokenizer, files: &[Loaded], rows: &[(usize, PreferenceExample)], report: &mut DataReport) -> Result<Vec<TokenizedPair>> {
    report.rows_read += rows.len();
    let mut out = Vec::with_capacity(rows.len());
    let mut i = 0;
    while i < rows.len() {
        let f = rows[i].0;
        let j = rows[i..].iter().position(|(g, _)| *g != f).map_or(rows.len(), |k| i + k);
        let ex: Vec<PreferenceExample> = rows[i..j].iter().map(|(_, e)| e.clone()).collect();
        out.extend(pt.tokenize_all(&ex, &files[f].source, report)?);
        i = j;
    }
    Ok(out)
}

/// Tokenize the rows with the model's tokenizer (and the template override).
///
/// Errors: tokenization errors (named `file:line`), no training pair left.
pub fn tokenize(cfg: &RunConfig, rows: &Rows, tokenizer: &crate::model::tokenizer::Tokenizer) -> Result<Splits> {
    let template = template_override(cfg)?;
    let on_identical = match cfg.data.on_identical {
        crate::config::OnIdentical::Skip => crate::data::OnIdentical::Skip,
        crate::config::OnIdentical::Error => crate::data::OnIdentical::Error,
    };
    let mut pt = PairTokenizer::new(tokenizer, template.as_deref(), tokenize_options(cfg))?.with_on_identical(on_identical);
    if let Some(TemplateSource::File(p)) = cfg.data.chat_template_source() {
        pt = pt.with_template_name(format!("the chat template {}", p.display()));
    }
    let mut train_report = DataReport::default();
    let mut eval_report = DataReport::default();
    let train = tokenize_rows(&pt, &rows.files, &rows.train, &mut train_report)?;
    let eval = tokenize_rows(&pt, &rows.files, &rows.eval, &mut eval_report)?;
    if train.is_empty() {
        return Err(Error::Config(format!(
            "no training pair left after tokenization ({} rows, all skipped; data.max_length = {})",
            rows.train.len(),
            cfg.data.max_length
        )));
    }
    Ok(Splits { train, eval, train_report, eval_report })
}

// ------------------------------------------------------------------------------------------
// One micro-batch, evaluation
// ------------------------------------------------------------------------------------------

/// The policy half of a training micro-batch: policy forward (adapters on), completion
/// log-probs ([`reference::model_logps_with`]: LM head at completion positions only; with
/// `t.share_prompt` each pair's prompt runs once), the loss of `t.loss_type` against `ref_logps`, and its backward.
///
/// `batch`: `2B` rows in the concatenated layout; `ref_logps`: `(2B,)` f32 reference log-probs
/// in the same layout. Returns the loss output (loss, per-pair losses, reward metrics) and the
/// gradients.
pub fn micro_batch(model: &Model, batch: &Batch, ref_logps: &Tensor, t: &TrainingSection) -> Result<(LossOutput, GradStore)> {
    let logps = reference::model_logps_with(model, batch, true, t.share_prompt)?;
    let out = loss_of(&logps, ref_logps, &batch.completion_mask, t)?;
    let grads = out.loss.backward()?;
    Ok((out, grads))
}

fn loss_of(policy: &Tensor, reference: &Tensor, completion_mask: &Tensor, t: &TrainingSection) -> Result<LossOutput> {
    let (pc, pr) = split_pairs(policy)?;
    let (rc, rr) = split_pairs(&reference.to_dtype(policy.dtype())?)?;
    let (nc, nr) = split_pairs(&completion_token_counts(completion_mask)?.to_dtype(policy.dtype())?)?;
    let logps = PairLogps { policy_chosen: pc, policy_rejected: pr, reference_chosen: rc, reference_rejected: rr, chosen_tokens: nc, rejected_tokens: nr };
    preference_loss(t.loss_type, &logps, &t.loss_params(), t.rpo_alpha)
}

/// Loss and reward metrics of the policy on `pairs` (file order, `batch_size` pairs a forward,
/// no gradients), over all pairs at once (the loss is the mean over pairs). Returns
/// `(loss, metrics, real tokens)`.
pub fn evaluate(model: &Model, pairs: &[TokenizedPair], refs: &PairRefLogps, batch_size: usize, pad: u32, t: &TrainingSection) -> Result<(f64, RewardMetrics, usize)> {
    let dev = model.device().clone();
    let (mut policy, mut reference, mut masks_c, mut masks_r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0usize;
    for (k, chunk) in pairs.chunks(batch_size.max(1)).enumerate() {
        let refs_b: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = collate(&refs_b, pad, &dev)?;
        tokens += batch.attention_mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize;
        let lp = reference::batch_logps_with(model, &batch, true, t.share_prompt)?;
        let idx: Vec<usize> = (k * batch_size.max(1)..k * batch_size.max(1) + chunk.len()).collect();
        let r = refs.gather(&idx, &dev)?;
        let counts = completion_token_counts(&batch.completion_mask)?;
        let (a, b) = split_pairs(&lp)?;
        let (ra, rb) = split_pairs(&r)?;
        let (ca, cb) = split_pairs(&counts)?;
        policy.push((a, b));
        reference.push((ra, rb));
        masks_c.push(ca);
        masks_r.push(cb);
    }
    if policy.is_empty() {
        return Err(Error::Msg("evaluate: no pairs".into()));
    }
    let cat = |v: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&v, 0)?) };
    let (pc, pr): (Vec<Tensor>, Vec<Tensor>) = policy.into_iter().unzip();
    let (rc, rr): (Vec<Tensor>, Vec<Tensor>) = reference.into_iter().unzip();
    let logps = PairLogps {
        policy_chosen: cat(pc)?,
        policy_rejected: cat(pr)?,
        reference_chosen: cat(rc)?,
        reference_rejected: cat(rr)?,
        chosen_tokens: cat(masks_c)?,
        rejected_tokens: cat(masks_r)?,
    };
    let out = preference_loss(t.loss_type, &logps, &t.loss_params(), t.rpo_alpha)?;
    Ok((out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, out.metrics, tokens))
}

// ------------------------------------------------------------------------------------------
// The data position
// ------------------------------------------------------------------------------------------

/// Walks the sampler's batches epoch after epoch; its position is checkpointed.
struct DataCursor {
    lengths: Vec<usize>,
    sampler: SamplerConfig,
    pos: DataPosition,
    batches: Vec<Vec<usize>>,
    batches_epoch: Option<u64>,
}

impl DataCursor {
    fn new(lengths: Vec<usize>, sampler: SamplerConfig, pos: DataPosition) -> Self {
        Self { lengths, sampler, pos, batches: Vec::new(), batches_epoch: None }
    }

    fn ensure(&mut self) -> Result<()> {
        if self.batches_epoch != Some(self.pos.epoch) {
            self.batches = epoch_batches(&self.lengths, &self.sampler, self.pos.epoch)?;
            self.batches_epoch = Some(self.pos.epoch);
        }
        Ok(())
    }

    fn batches_per_epoch(&self) -> usize {
        let n = self.lengths.len();
        let b = self.sampler.batch_size;
        if self.sampler.drop_last { n / b } else { n.div_ceil(b) }
    }

    /// The next micro-batch's pair indices.
    fn next(&mut self) -> Result<Vec<usize>> {
        self.ensure()?;
        if self.pos.index_in_epoch as usize >= self.batches.len() {
            self.pos = DataPosition { epoch: self.pos.epoch + 1, index_in_epoch: 0 };
            self.ensure()?;
        }
        let b = self.batches[self.pos.index_in_epoch as usize].clone();
        self.pos.index_in_epoch += 1;
        Ok(b)
    }

    /// Fractional epochs consumed.
    fn epoch(&self) -> f64 {
        self.pos.epoch as f64 + self.pos.index_in_epoch as f64 / self.batches_per_epoch().max(1) as f64
    }
}

// ------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------

fn dtype_of(d: ModelDtype) -> DType {
    match d {
        ModelDtype::F32 => DType::F32,
        ModelDtype::Bf16 => DType::BF16,
        ModelDtype::F16 => DType::F16,
    }
}

fn load_model(source: &str, cfg: &RunConfig) -> Result<crate::model::LoadedModel> {
    let opts = crate::model::LoadOptions { revision: Some(cfg.model.revision.clone()), dtype: dtype_of(cfg.model.dtype), device: Device::Cpu };
    crate::model::load(source, &opts)
}

/// The loss is finite and the gradient norm too, or training stops here.
fn check_finite(step: u64, loss: f64, grad_norm: f64, output_dir: &Path) -> Result<()> {
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(());
    }
    let last = checkpoint::latest_complete(output_dir)?
        .map(|(s, p)| format!("the last good checkpoint (step {s}) is {}", p.display()))
        .unwrap_or_else(|| "no checkpoint was written before it".into());
    Err(Error::Msg(format!(
        "training stopped at step {}: non-finite {} (loss {loss}, grad_norm {grad_norm}); nothing of this step was applied; {last}. \
         Try a lower training.learning_rate or training.max_grad_norm > 0",
        step + 1,
        if loss.is_finite() { "gradient norm" } else { "loss" },
    )))
}

/// Sums over the steps of a logging interval.
#[derive(Default)]
struct Interval {
    steps: usize,
    loss: f64,
    grad_norm: f64,
    metrics: RewardMetrics,
    tokens: usize,
    start: Option<Instant>,
}

impl Interval {
    fn add(&mut self, loss: f64, grad_norm: f64, m: &RewardMetrics, tokens: usize) {
        self.steps += 1;
        self.loss += loss;
        self.grad_norm += grad_norm;
        add_metrics(&mut self.metrics, m, 1.0);
        self.tokens += tokens;
    }
}

fn add_metrics(acc: &mut RewardMetrics, m: &RewardMetrics, w: f64) {
    acc.rewards_chosen += w * m.rewards_chosen;
    acc.rewards_rejected += w * m.rewards_rejected;
    acc.rewards_accuracies += w * m.rewards_accuracies;
    acc.rewards_ties += w * m.rewards_ties;
    acc.rewards_margins += w * m.rewards_margins;
    acc.logps_chosen += w * m.logps_chosen;
    acc.logps_rejected += w * m.logps_rejected;
}

fn scale_metrics(m: &RewardMetrics, s: f64) -> RewardMetrics {
    let mut out = RewardMetrics::default();
    add_metrics(&mut out, m, s);
    out
}

/// Train as `cfg` says (see the module doc). Prints the setup summary and progress to stderr.
///
/// Errors: bad data or model (named), an output folder holding another run without
/// `training.overwrite`, an unwritable output folder, a trainable tensor without gradient
/// (`no gradient for NAME`, at the first step), a non-finite loss or gradient norm.
pub fn run(cfg: &RunConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    let t = &cfg.training;
    let started = Instant::now();
    let say = |s: &str| eprintln!("{s}");

    // ---- setup: data rows (fails fast on bad files), model, adapter, tokens
    let rows = read_rows(cfg)?;
    let output_dir = opts.resume.clone().unwrap_or_else(|| PathBuf::from(&t.output_dir));
    let resume_from = match &opts.resume {
        Some(dir) => Some(checkpoint::latest_complete(dir)?.ok_or_else(|| {
            Error::input(dir, None, "--resume: no complete checkpoint in this folder (checkpoints/step-N/)")
        })?),
        None => None,
    };
    let loaded = load_model(&cfg.model.path_or_id, cfg)?;
    let mut model = loaded.model;
    let tokenizer = loaded.tokenizer;
    let separate_ref = match &cfg.model.reference {
        Some(r) => Some(load_model(r, cfg)?.model),
        None => None,
    };
    let adapter = attach_adapter(&mut model, cfg)?;
    let params: Vec<(String, Var)> = adapter.vars();
    let splits = tokenize(cfg, &rows, &tokenizer)?;
    let pad = pad_id(&tokenizer)?;

    // ---- schedule
    let sampler = SamplerConfig { batch_size: t.per_device_train_batch_size, seed: t.seed, mega_batch_factor: 50, drop_last: false };
    let lengths: Vec<usize> = splits.train.iter().map(|p| p.max_len()).collect();
    let batches_per_epoch = lengths.len().div_ceil(sampler.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(t.gradient_accumulation_steps).max(1);
    let total_steps = t.total_steps(steps_per_epoch) as u64;
    let schedule = t.lr_schedule(total_steps as usize);

    // ---- summary
    say(&format!("ropo train: model {} ({} layers, hidden {}), {} threads", cfg.model.path_or_id, loaded.config.num_hidden_layers, loaded.config.hidden_size, rayon::current_num_threads()));
    if let Some(r) = &cfg.model.reference {
        say(&format!("reference model: {r} (separate)"));
    } else {
        say("reference model: the policy with adapters bypassed");
    }
    say(&format!("{}", adapter.report()));
    for f in &rows.files {
        say(&format!("data {} (format {}): {} rows read, {} skipped while loading", f.source.display(), f.format, f.report.rows_read, f.report.total_skipped()));
        for (reason, c) in &f.report.skipped {
            say(&format!("  {reason}: {c}"));
        }
    }
    say(&format!("train split: {} pairs from {} rows", splits.train.len(), rows.train.len()));
    for l in splits.train_report.to_string().lines().skip(1) {
        say(&format!("  {l}"));
    }
    if !rows.eval.is_empty() {
        say(&format!("eval split: {} pairs from {} rows", splits.eval.len(), rows.eval.len()));
        for l in splits.eval_report.to_string().lines().skip(1) {
            say(&format!("  {l}"));
        }
    }
    let mean_tokens = splits.train.iter().map(|p| p.chosen_len() + p.rejected_len()).sum::<usize>() as f64 / splits.train.len() as f64;
    let pairs_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps;
    say(&format!(
        "tokens per step: {pairs_per_step} pairs ({} x {} accumulation) = {} sequences, ~{:.0} real tokens (at most {})",
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        2 * pairs_per_step,
        mean_tokens * pairs_per_step as f64,
        2 * pairs_per_step * cfg.data.max_length
    ));
    say(&format!(
        "{} steps ({} per epoch), loss {}, beta {}, lr {} ({:?}, {} warmup), max_grad_norm {}",
        total_steps, steps_per_epoch, t.loss_type, t.beta, t.learning_rate, t.lr_scheduler_type, schedule.warmup_steps, t.max_grad_norm
    ));

    // ---- output folder (after every check that needs no writing)
    if resume_from.is_none() {
        checkpoint::prepare_output_dir(&output_dir, t.overwrite)?;
        crate::fsutil::write_atomic(&output_dir.join(CONFIG_FILE), cfg.to_toml_string().as_bytes())
            .map_err(|e| Error::input(output_dir.join(CONFIG_FILE), None, format!("writing: {e}")))?;
    }

    // ---- reference log-probs
    let ref_model: &Model = separate_ref.as_ref().unwrap_or(&model);
    let train_refs: Option<PairRefLogps> = if t.precompute_ref_log_probs {
        let key = reference::cache_key(
            &[
                &cfg.model.path_or_id,
                cfg.model.reference.as_deref().unwrap_or(""),
                &cfg.model.revision,
                &format!("{:?}", cfg.model.dtype),
                &format!("{:?}", tokenize_options(cfg)),
                &template_override(cfg)?.unwrap_or_default(),
                &format!("batch {}", t.per_device_eval_batch_size),
                &format!("share_prompt {}", t.share_prompt),
            ],
            &splits.train,
        );
        let path = reference::cache_path(&output_dir.join(REFERENCE_DIR), &key);
        match reference::load_cache(&path, splits.train.len())? {
            Some(r) => {
                say(&format!("reference log-probs: cached ({})", path.display()));
                Some(r)
            }
            None => {
                say(&format!("reference log-probs: computing for {} pairs", splits.train.len()));
                let r = reference::compute_all(ref_model, &splits.train, t.per_device_eval_batch_size, pad, t.share_prompt, |_, _| {})?;
                reference::save_cache(&path, &r)?;
                Some(r)
            }
        }
    } else {
        None
    };
    let eval_refs = if splits.eval.is_empty() {
        None
    } else {
        Some(reference::compute_all(ref_model, &splits.eval, t.per_device_eval_batch_size, pad, t.share_prompt, |_, _| {})?)
    };

    // ---- optimiser, state, resume
    let mut opt = AdamW::new(params.clone(), t.adamw())?;
    // The training RNG: checkpointed with the run; nothing samples from it yet (no dropout).
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed);
    let mut state = TrainerState {
        max_steps: total_steps,
        num_train_epochs: t.num_train_epochs,
        logging_steps: t.logging_steps as u64,
        eval_steps: t.eval_steps as u64,
        save_steps: t.save_steps as u64,
        train_batch_size: t.per_device_train_batch_size as u64,
        ..Default::default()
    };
    let mut pos = DataPosition::default();
    let mut step: u64 = 0;
    let metrics_path = output_dir.join(METRICS_FILE);
    let mut logger = if let Some((s, dir)) = &resume_from {
        let ck = checkpoint::load(dir, &Device::Cpu)?;
        ck.restore_trainable(&params)?;
        ck.restore_optimizer(&mut opt)?;
        rng = ck.meta.rng.restore()?;
        pos = ck.meta.data;
        step = ck.meta.global_step;
        state = ck.trainer_state.clone();
        state.max_steps = total_steps;
        say(&format!("resuming from {} (step {s})", dir.display()));
        MetricsLogger::resume(&metrics_path, step)?
    } else {
        MetricsLogger::create(&metrics_path)?
    };
    let mut cursor = DataCursor::new(lengths, sampler, pos);
    let progress = if opts.progress { Progress::new(total_steps, step) } else { Progress::hidden(total_steps, step) };
    let train_start = Instant::now();
    // After --resume, elapsed_seconds continues from the checkpoint's last record, so it is the
    // run's training time so far (the time between that record and the kill is not counted).
    let elapsed_before = state
        .log_history
        .iter()
        .rev()
        .find_map(|r| r.get("elapsed_seconds").and_then(|v| v.as_f64()))
        .unwrap_or(0.0);
    let elapsed = || elapsed_before + train_start.elapsed().as_secs_f64();

    let log = |logger: &mut MetricsLogger, state: &mut TrainerState, rec: crate::metrics::Record| -> Result<()> {
        logger.log(&rec)?;
        state.log_history.push(rec);
        Ok(())
    };
    let run_eval = |step: u64, epoch: f64| -> Result<Option<EvalStats>> {
        let Some(refs) = &eval_refs else { return Ok(None) };
        let t0 = Instant::now();
        let (loss, rewards, tokens) = evaluate(&model, &splits.eval, refs, t.per_device_eval_batch_size, pad, t)?;
        let secs = t0.elapsed().as_secs_f64();
        Ok(Some(EvalStats { step, epoch, loss, rewards, tokens_per_second: tokens as f64 / secs.max(1e-9), elapsed_seconds: 0.0 }))
    };

    let mut first_eval = None;
    let mut last_eval = None;
    if resume_from.is_none() {
        if let Some(mut e) = run_eval(0, 0.0)? {
            e.elapsed_seconds = elapsed();
            progress.println(&format!("eval at step 0: loss {:.4}, rewards/accuracies {:.3}, rewards/ties {:.3}, rewards/margins {:.4}", e.loss, e.rewards.rewards_accuracies, e.rewards.rewards_ties, e.rewards.rewards_margins));
            log(&mut logger, &mut state, e.record())?;
            first_eval = Some(e);
            last_eval = first_eval;
        }
    }

    // ---- the loop
    let mut interval = Interval { start: Some(Instant::now()), ..Default::default() };
    let mut run_tokens = 0usize;
    let mut outcome = Outcome::Finished;
    while step < total_steps {
        let lr = schedule.lr_at(step as usize);
        let mut acc = GradAccumulator::new(t.gradient_accumulation_steps);
        let mut step_loss = 0.0;
        let mut step_metrics = RewardMetrics::default();
        let mut step_tokens = 0usize;
        let w = 1.0 / t.gradient_accumulation_steps as f64;
        for _ in 0..t.gradient_accumulation_steps {
            let idx = cursor.next()?;
            let pairs: Vec<&TokenizedPair> = idx.iter().map(|&i| &splits.train[i]).collect();
            let batch = collate(&pairs, pad, model.device())?;
            step_tokens += batch.attention_mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize;
            let ref_lp = match &train_refs {
                Some(r) => r.gather(&idx, model.device())?,
                None => reference::batch_logps_with(ref_model, &batch, false, t.share_prompt)?,
            };
            let (out, grads) = micro_batch(&model, &batch, &ref_lp, t)?;
            acc.add(&params, &grads).map_err(|e| {
                Error::Msg(format!("{e}: this trainable tensor is not on the loss's autograd path (a frozen adapter would be silently useless)"))
            })?;
            step_loss += w * out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            add_metrics(&mut step_metrics, &out.metrics, w);
        }
        let mut grads = acc.take()?;
        let grad_norm = grads.clip_global_norm(t.max_grad_norm)?;
        check_finite(step, step_loss, grad_norm, &output_dir)?;
        opt.step(&grads, lr)?;
        step += 1;
        run_tokens += step_tokens;
        state.global_step = step;
        state.epoch = cursor.epoch();
        state.num_input_tokens_seen += step_tokens as u64;
        interval.add(step_loss, grad_norm, &step_metrics, step_tokens);

        if step % t.logging_steps as u64 == 0 || step == total_steps {
            let n = interval.steps.max(1) as f64;
            let secs = interval.start.map_or(0.0, |s| s.elapsed().as_secs_f64());
            let stats = TrainStats {
                step,
                epoch: state.epoch,
                loss: interval.loss / n,
                rewards: scale_metrics(&interval.metrics, 1.0 / n),
                grad_norm: interval.grad_norm / n,
                learning_rate: lr,
                tokens_per_second: interval.tokens as f64 / secs.max(1e-9),
                elapsed_seconds: elapsed(),
            };
            log(&mut logger, &mut state, stats.record())?;
            progress.update(step, stats.loss, stats.rewards.rewards_accuracies, stats.rewards.rewards_margins, stats.tokens_per_second);
            interval = Interval { start: Some(Instant::now()), ..Default::default() };
        }
        if t.eval_steps > 0 && step % t.eval_steps as u64 == 0 && step < total_steps {
            if let Some(mut e) = run_eval(step, state.epoch)? {
                e.elapsed_seconds = elapsed();
                progress.println(&format!("eval at step {step}: loss {:.4}, rewards/accuracies {:.3}, rewards/ties {:.3}, rewards/margins {:.4}", e.loss, e.rewards.rewards_accuracies, e.rewards.rewards_ties, e.rewards.rewards_margins));
                log(&mut logger, &mut state, e.record())?;
                last_eval = Some(e);
            }
        }
        let stop = STOP_REQUESTED.load(Ordering::SeqCst);
        if (t.save_steps > 0 && step % t.save_steps as u64 == 0) || stop {
            let meta = CheckpointMeta {
                format_version: checkpoint::FORMAT_VERSION,
                global_step: step,
                scheduler_step: step,
                total_steps,
                rng: RngState::capture(&rng),
                data: cursor.pos,
                ropo_version: env!("CARGO_PKG_VERSION").into(),
            };
            let dir = checkpoint::save(&output_dir, &CheckpointData { trainable: &params, optimizer: &opt, meta, config: cfg, trainer_state: &state })?;
            checkpoint::prune(&output_dir, t.save_total_limit)?;
            state.save(&output_dir.join(checkpoint::TRAINER_STATE_FILE))?;
            if stop {
                progress.finish();
                say(&format!("interrupted: checkpoint written to {}; continue with `ropo train --config ... --resume {}`", dir.display(), output_dir.display()));
                outcome = Outcome::Interrupted { step, checkpoint: dir };
                break;
            }
        }
    }

    if outcome == Outcome::Finished {
        progress.finish();
        if let Some(mut e) = run_eval(step, state.epoch)? {
            e.elapsed_seconds = elapsed();
            say(&format!("eval at step {step}: loss {:.4}, rewards/accuracies {:.3}, rewards/ties {:.3}, rewards/margins {:.4}", e.loss, e.rewards.rewards_accuracies, e.rewards.rewards_ties, e.rewards.rewards_margins));
            log(&mut logger, &mut state, e.record())?;
            last_eval = Some(e);
        }
        save_adapter(&output_dir, &adapter)?;
        state.save(&output_dir.join(checkpoint::TRAINER_STATE_FILE))?;
        // training curves (loss, accuracies, margins; train and eval): reported, never fatal
        let curves = output_dir.join("curves.png");
        match crate::plot::plot_metrics_file(&output_dir.join(METRICS_FILE), &curves) {
            Ok(_) => say(&format!("training curves written to {}", curves.display())),
            Err(e) => say(&format!("warning: training curves not written: {e}")),
        }
    }
    let wall_seconds = train_start.elapsed().as_secs_f64();
    let tokens_per_second = run_tokens as f64 / wall_seconds.max(1e-9);
    let peak = peak_rss_kib();
    say(&format!(
        "done: {step} steps in {:.1} s ({:.1} s with setup), {:.0} real tokens/s, peak RSS {}",
        wall_seconds,
        started.elapsed().as_secs_f64(),
        tokens_per_second,
        peak.map(|k| format!("{:.2} GiB", k as f64 / 1048576.0)).unwrap_or_else(|| "unknown".into())
    ));
    if outcome == Outcome::Finished {
        say(&format!("adapter written to {}", output_dir.display()));
    }
    Ok(TrainSummary { outcome, output_dir, global_step: step, first_eval, last_eval, wall_seconds, tokens_per_second, peak_rss_kib: peak })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_walks_epochs_and_resumes_at_the_same_batch() {
        let lengths = vec![5, 3, 8, 1, 9];
        let s = SamplerConfig { batch_size: 2, seed: 7, mega_batch_factor: 50, drop_last: false };
        let mut a = DataCursor::new(lengths.clone(), s, DataPosition::default());
        let seq: Vec<Vec<usize>> = (0..7).map(|_| a.next().unwrap()).collect();
        // epoch 0 has 3 batches covering every index once
        let mut first: Vec<usize> = seq[..3].concat();
        first.sort();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        assert_eq!(a.pos, DataPosition { epoch: 2, index_in_epoch: 1 });
        assert!((a.epoch() - (2.0 + 1.0 / 3.0)).abs() < 1e-12);
        // a cursor restored at batch 4 replays the rest
        let mut b = DataCursor::new(lengths, s, DataPosition { epoch: 1, index_in_epoch: 1 });
        let rest: Vec<Vec<usize>> = (0..3).map(|_| b.next().unwrap()).collect();
        assert_eq!(rest, seq[4..].to_vec());
    }

    #[test]
    fn non_finite_loss_or_norm_stops_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        check_finite(3, 0.5, 1.0, dir.path()).unwrap();
        let e = check_finite(3, f64::NAN, 1.0, dir.path()).unwrap_err().to_string();
        assert!(e.contains("step 4") && e.contains("non-finite loss") && e.contains("no checkpoint"), "{e}");
        let e = check_finite(3, 0.5, f64::INFINITY, dir.path()).unwrap_err().to_string();
        assert!(e.contains("non-finite gradient norm"), "{e}");
    }

    #[test]
    fn slices_select_rows() {
        let v: Vec<usize> = (0..10).collect();
        assert_eq!(slice(&v, Some(RowSlice { start: None, end: Some(3) })), vec![0, 1, 2]);
        assert_eq!(slice(&v, Some(RowSlice { start: Some(-2), end: None })), vec![8, 9]);
        assert_eq!(slice(&v, None), v);
    }
}

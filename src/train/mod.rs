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
//! it with `training.threads` (or `RAYON_NUM_THREADS`; see [`crate::process::configure_threads`]).
//!
//! Every output file is written atomically (temporary sibling, then rename); `metrics.jsonl` is
//! appended one flushed line at a time and cut back to the checkpoint on resume.
//!
//! Data parallel ([`run_in`] with a [`Collective`] of N ranks, e.g. `mpirun -np N`): a step has
//! `gradient_accumulation_steps x N` micro-batches, rank r runs micro-batches `r, r + N, ...`,
//! and every rank accumulates every micro-batch's gradients in one global order ([`parallel`]),
//! so N ranks give the adapters, optimiser state and metrics of one process with the same global
//! batch, bit for bit (same threads per process). Only rank 0 prints and writes the output
//! folder; every rank resumes from the same checkpoint.

pub mod diagnostics;
pub mod parallel;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::AnyAdapterSet;
use crate::collective::{check_same, Collective, ExchangeStats, SingleProcess};
use crate::checkpoint::{self, CheckpointData, CheckpointMeta, DataPosition, RngState, TrainerState};
use crate::checkpoint::{CURVES_FILE, METRICS_FILE, REFERENCE_DIR, RUN_CONFIG_FILE, TRAINER_STATE_FILE};
use crate::config::{ModelDtype, RunConfig, TrainingSection};
use crate::data::batch::{collate, epoch_batches, pad_id, Batch, SamplerConfig};
use crate::data::splits::{read_rows, template_override, tokenize_options, tokenize_splits, Rows, Splits};
use crate::data::tokenize::TokenizedPair;
use crate::error::{Error, Result};
use crate::logps::{completion_token_counts, split_pairs};
use crate::loss::{combined_loss, LossOutput, PairExtras, PairLogps, RewardMetrics};
use crate::metrics::{EvalStats, MetricsLogger, Progress, TrainStats};
use crate::model::llama::Model;
use crate::optim::{AdamW, GradAccumulator, Grads, LrSchedule};
use crate::reference::{self, PairRefLogps};

/// Set by the SIGINT (Ctrl-C) handler that `ropo train` installs; the loop checks it at the end
/// of every optimiser step, writes a checkpoint and returns [`Outcome::Interrupted`] (with
/// several ranks: when any rank was interrupted, all stop after the same step).
pub static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Set on the ranks other than 0 of a data-parallel run: they print nothing ([`say`]).
static QUIET: AtomicBool = AtomicBool::new(false);

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
// One micro-batch, evaluation
// ------------------------------------------------------------------------------------------

/// The policy half of a training micro-batch: policy forward (adapters on), completion
/// log-probs ([`crate::logps::batch_logps`]: LM head at completion positions only; with
/// `t.share_prompt` each pair's prompt runs once), the loss of `t.loss_type` against `ref_logps`, and its backward.
///
/// `batch`: `2B` rows in the concatenated layout; `ref_logps`: `(2B,)` f32 reference log-probs
/// in the same layout. Returns the loss output (loss, per-pair losses, reward metrics) and the
/// gradients.
pub fn micro_batch(model: &Model, batch: &Batch, ref_logps: &Tensor, t: &TrainingSection) -> Result<(LossOutput, GradStore)> {
    let seq = crate::logps::batch_logps_with(model, batch, true, t.share_prompt, &t.logp_options())?;
    let halves = |x: &Option<Tensor>| -> Result<Option<(Tensor, Tensor)>> { x.as_ref().map(split_pairs).transpose() };
    let extras = PairExtras { chosen_unweighted: halves(&seq.unweighted)?.map(|(c, _)| c), wpo_weights: halves(&seq.wpo_weights)? };
    let out = loss_of(&seq.logps, ref_logps, &batch.completion_mask, &extras, t)?;
    let grads = out.loss.backward()?;
    Ok((out, grads))
}

fn loss_of(policy: &Tensor, reference: &Tensor, completion_mask: &Tensor, extras: &PairExtras, t: &TrainingSection) -> Result<LossOutput> {
    let (pc, pr) = split_pairs(policy)?;
    let (rc, rr) = split_pairs(&reference.to_dtype(policy.dtype())?)?;
    let (nc, nr) = split_pairs(&completion_token_counts(completion_mask)?.to_dtype(policy.dtype())?)?;
    let logps = PairLogps { policy_chosen: pc, policy_rejected: pr, reference_chosen: rc, reference_rejected: rr, chosen_tokens: nc, rejected_tokens: nr };
    combined_loss(&t.loss_spec(), &logps, extras, &t.loss_params())
}

/// Loss and reward metrics of the policy on `pairs` (file order, `batch_size` pairs a forward,
/// no gradients: [`crate::logps::score_pairs_with`]), over all pairs at once (the loss is the mean
/// over pairs), against the precomputed reference log-probs `refs`. Returns `(loss, metrics,
/// loss terms, real tokens)`.
pub fn evaluate(model: &Model, pairs: &[TokenizedPair], refs: &PairRefLogps, batch_size: usize, pad: u32, t: &TrainingSection) -> Result<(f64, RewardMetrics, Vec<(&'static str, f64)>, usize)> {
    evaluate_in(&SingleProcess, &ExchangeStats::default(), model, pairs, refs, batch_size, pad, t)
}

/// [`evaluate`] with the pairs scored in shares over the ranks of `world`
/// ([`parallel::policy_scores`]); the same result on every rank and for every rank count.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_in(world: &dyn Collective, stats: &ExchangeStats, model: &Model, pairs: &[TokenizedPair], refs: &PairRefLogps, batch_size: usize, pad: u32, t: &TrainingSection) -> Result<(f64, RewardMetrics, Vec<(&'static str, f64)>, usize)> {
    let scores = parallel::policy_scores(world, stats, model, pairs, pad, batch_size.max(1), t.share_prompt, &t.logp_options())?;
    let (policy_chosen, policy_rejected) = scores.policy.expect("a policy pass");
    let all: Vec<usize> = (0..pairs.len()).collect();
    let (reference_chosen, reference_rejected) = split_pairs(&refs.gather(&all, model.device())?)?;
    let (chosen_tokens, rejected_tokens) = scores.tokens;
    let logps = PairLogps { policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens };
    let extras = PairExtras { chosen_unweighted: scores.policy_unweighted.map(|(c, _)| c), wpo_weights: scores.policy_wpo_weights };
    let out = combined_loss(&t.loss_spec(), &logps, &extras, &t.loss_params())?;
    Ok((out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, out.metrics, out.terms, scores.real_tokens))
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

fn load_model(source: &str, cfg: &RunConfig, device: &Device) -> Result<crate::model::LoadedModel> {
    let opts = crate::model::LoadOptions { revision: Some(cfg.model.revision.clone()), dtype: dtype_of(cfg.model.dtype), device: device.clone() };
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

/// What one optimiser step did: its loss and reward metrics (means over its micro-batches), the
/// gradient norm before clipping, its real tokens.
#[derive(Default)]
struct StepStats {
    /// Some rank was interrupted (Ctrl-C) during the step: every rank stops after it.
    stop: bool,
    loss: f64,
    grad_norm: f64,
    metrics: RewardMetrics,
    /// The loss terms' means (logged only for a loss list or an `sft` term: [`logged_terms`]).
    terms: Vec<(&'static str, f64)>,
    tokens: usize,
}

/// `acc += w · terms`, by position (every batch has the spec's terms in its order).
fn add_terms(acc: &mut Vec<(&'static str, f64)>, terms: &[(&'static str, f64)], w: f64) {
    if acc.is_empty() {
        acc.extend(terms.iter().map(|&(k, _)| (k, 0.0)));
    }
    for (a, &(_, v)) in acc.iter_mut().zip(terms) {
        a.1 += w * v;
    }
}

/// The terms worth a metric of their own: none for a single pairwise loss (its value is `loss`).
fn logged_terms(terms: Vec<(&'static str, f64)>) -> Vec<(&'static str, f64)> {
    match terms.as_slice() {
        [(name, _)] if *name != crate::loss::LossTerm::Sft.metric_name() => Vec::new(),
        _ => terms,
    }
}

/// Sums over the steps of a logging interval.
#[derive(Default)]
struct Interval {
    steps: usize,
    loss: f64,
    grad_norm: f64,
    metrics: RewardMetrics,
    terms: Vec<(&'static str, f64)>,
    tokens: usize,
    start: Option<Instant>,
}

impl Interval {
    fn add(&mut self, loss: f64, grad_norm: f64, m: &RewardMetrics, terms: &[(&'static str, f64)], tokens: usize) {
        self.steps += 1;
        self.loss += loss;
        self.grad_norm += grad_norm;
        add_metrics(&mut self.metrics, m, 1.0);
        add_terms(&mut self.terms, terms, 1.0);
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
    run_in(cfg, opts, &SingleProcess)
}

/// [`run`] as one rank of `world` (data parallel; see the module doc). Every rank calls it with
/// the same config; rank 0 prints and writes, and returns the same summary as the others.
///
/// Errors: as [`run`], plus a rank whose config, model or checkpoint differs from rank 0's
/// (refused before training, on every rank) and a failed exchange.
pub fn run_in(cfg: &RunConfig, opts: &TrainOptions, world: &dyn Collective) -> Result<TrainSummary> {
    let started = Instant::now();
    QUIET.store(!world.is_main(), Ordering::SeqCst);
    let s = setup(cfg, opts, world)?;
    print_summary(cfg, &s);
    if s.resume_from.is_none() && world.is_main() {
        // after every check that needs no writing
        start_output_dir(cfg, &s.output_dir)?;
    }
    let refs = reference_logps(cfg, &s)?;
    let mut st = restore(cfg, &s)?;
    let progress = if opts.progress && world.is_main() { Progress::new(s.total_steps, st.step) } else { Progress::hidden(s.total_steps, st.step) };
    let first_eval = match s.resume_from {
        None => eval_and_log(cfg, &s, &refs, &mut st, |l| progress.println(l))?,
        Some(_) => None,
    };
    let mut last_eval = first_eval.clone();
    let (outcome, run_tokens) = train_loop(cfg, &s, &refs, &mut st, &progress, &mut last_eval)?;
    if outcome == Outcome::Finished {
        progress.finish();
        last_eval = eval_and_log(cfg, &s, &refs, &mut st, say)?.or(last_eval);
        if world.is_main() {
            write_final(&s, &st)?;
        }
    }
    if world.size() > 1 {
        report_exchange(&s, st.step - s.resume_from.as_ref().map_or(0, |r| r.0))?;
    }
    let wall_seconds = st.clock.start.elapsed().as_secs_f64();
    let tokens_per_second = run_tokens as f64 / wall_seconds.max(1e-9);
    let peak = crate::process::peak_rss_kib();
    say(&format!(
        "done: {} steps in {:.1} s ({:.1} s with setup), {:.0} real tokens/s, peak RSS {}",
        st.step,
        wall_seconds,
        started.elapsed().as_secs_f64(),
        tokens_per_second,
        peak.map(|k| format!("{:.2} GiB", k as f64 / 1048576.0)).unwrap_or_else(|| "unknown".into())
    ));
    if outcome == Outcome::Finished {
        say(&format!("adapter written to {}", s.output_dir.display()));
    }
    Ok(TrainSummary { outcome, output_dir: s.output_dir, global_step: st.step, first_eval, last_eval, wall_seconds, tokens_per_second, peak_rss_kib: peak })
}

/// The data-parallel report (collective): every rank's time in the exchange, its bytes sent a
/// step and its peak RSS, printed by rank 0.
fn report_exchange(s: &Setup, steps: u64) -> Result<()> {
    let (secs, bytes) = s.exchange.totals();
    let rss = crate::process::peak_rss_kib().unwrap_or(0) as f64 / 1048576.0;
    let all = s.world.all_gather_f64(&[secs, bytes as f64, rss])?;
    let steps = steps.max(1) as f64;
    let per_rank: Vec<String> = all.iter().enumerate().map(|(r, v)| format!("rank {r}: {:.3} s and {:.2} MB a step, peak RSS {:.2} GiB", v[0] / steps, v[1] / 1e6 / steps, v[2])).collect();
    say(&format!("data parallel: {} ranks; exchange (all-gathers, incl. waiting for the slowest rank) {}", s.world.size(), per_rank.join("; ")));
    Ok(())
}

/// The loop: one optimiser step a turn; log, evaluate and checkpoint on their intervals; on
/// Ctrl-C, a checkpoint at the end of the step and return. Returns how it ended and the real
/// tokens this process trained on.
fn train_loop(cfg: &RunConfig, s: &Setup, refs: &Refs, st: &mut State, progress: &Progress, last_eval: &mut Option<EvalStats>) -> Result<(Outcome, usize)> {
    let t = &cfg.training;
    let mut interval = Interval { start: Some(Instant::now()), ..Default::default() };
    let mut run_tokens = 0usize;
    while st.step < s.total_steps {
        let lr = s.schedule.lr_at(st.step as usize);
        let done = optimiser_step(t, s, refs, st, lr)?;
        run_tokens += done.tokens;
        interval.add(done.loss, done.grad_norm, &done.metrics, &done.terms, done.tokens);

        if st.step % t.logging_steps as u64 == 0 || st.step == s.total_steps {
            log_interval(st, &interval, lr, progress)?;
            interval = Interval { start: Some(Instant::now()), ..Default::default() };
        }
        if t.eval_steps > 0 && st.step % t.eval_steps as u64 == 0 && st.step < s.total_steps {
            if let Some(e) = eval_and_log(cfg, s, refs, st, |l| progress.println(l))? {
                *last_eval = Some(e);
            }
        }
        let stop = done.stop;
        if (t.save_steps > 0 && st.step % t.save_steps as u64 == 0) || stop {
            let dir = save_checkpoint(cfg, s, st)?;
            if stop {
                progress.finish();
                say(&format!("interrupted: checkpoint written to {}; continue with `ropo train --config ... --resume {}`", dir.display(), s.output_dir.display()));
                return Ok((Outcome::Interrupted { step: st.step, checkpoint: dir }, run_tokens));
            }
        }
    }
    Ok((Outcome::Finished, run_tokens))
}

/// One optimiser step: `gradient_accumulation_steps` rounds of one micro-batch per rank (rank
/// r runs micro-batches `r, r + N, r + 2N, ...` of the step's `GA x N`, [`run_micro_batch`]);
/// after each round every rank's gradients are gathered ([`parallel::gather_micro_batches`]) and
/// accumulated in micro-batch order with weight `1/(GA x N)`, as one process with `GA x N`
/// accumulation steps adds them; then clipping by global norm, the finiteness check, the AdamW
/// step at `lr`; the step counters move on.
fn optimiser_step(t: &TrainingSection, s: &Setup, refs: &Refs, st: &mut State, lr: f64) -> Result<StepStats> {
    let ranks = s.world.size();
    let micro_batches = t.gradient_accumulation_steps * ranks;
    let mut acc = GradAccumulator::new(micro_batches);
    let mut done = StepStats::default();
    let w = 1.0 / micro_batches as f64;
    for _ in 0..t.gradient_accumulation_steps {
        let mut mine = None;
        for r in 0..ranks {
            let idx = st.cursor.next()?;
            if r == s.world.rank() {
                mine = Some(run_micro_batch(t, s, refs, &idx)?);
            }
        }
        let local = mine.into_iter().collect();
        let (round, stop) = parallel::gather_micro_batches(s.world, &s.exchange, local, STOP_REQUESTED.load(Ordering::SeqCst))?;
        done.stop |= stop;
        for (grads, m) in round {
            acc.add_grads(grads)?;
            done.loss += w * m.loss;
            add_metrics(&mut done.metrics, &m.metrics, w);
            done.tokens += m.tokens;
            add_terms(&mut done.terms, &m.terms, w);
        }
    }
    let mut grads = acc.take()?;
    done.grad_norm = grads.clip_global_norm(t.max_grad_norm)?;
    check_finite(st.step, done.loss, done.grad_norm, &s.output_dir)?;
    st.opt.step(&grads, lr)?;
    st.step += 1;
    st.trainer.global_step = st.step;
    st.trainer.epoch = st.cursor.epoch();
    st.trainer.num_input_tokens_seen += done.tokens as u64;
    Ok(done)
}

/// One micro-batch of pair indices `idx`: collate, the reference log-probs (precomputed or a
/// reference forward), [`micro_batch`]; its gradients and statistics.
fn run_micro_batch(t: &TrainingSection, s: &Setup, refs: &Refs, idx: &[usize]) -> Result<(Grads, parallel::MicroStats)> {
    let pairs: Vec<&TokenizedPair> = idx.iter().map(|&i| &s.splits.train[i]).collect();
    let batch = collate(&pairs, s.pad, s.model.device())?;
    let tokens = batch.attention_mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize;
    let ref_lp = match &refs.train {
        Some(r) => r.gather(idx, s.model.device())?,
        None => crate::logps::batch_logps_detached_with(s.reference(), &batch, false, t.share_prompt, &t.logp_options().reference())?.logps,
    };
    let (out, store) = micro_batch(&s.model, &batch, &ref_lp, t)?;
    let grads = Grads::from_store(&s.params, &store).map_err(|e| {
        Error::Msg(format!("{e}: this trainable tensor is not on the loss's autograd path (a frozen adapter would be silently useless)"))
    })?;
    let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((grads, parallel::MicroStats { loss, metrics: out.metrics, terms: out.terms, tokens }))
}

// ------------------------------------------------------------------------------------------
// The steps of the run
// ------------------------------------------------------------------------------------------

/// What the run reads and never changes: the model with its adapter, the tokenized data, the
/// schedule. Built by [`setup`].
struct Setup<'w> {
    /// The ranks of the run (one process: [`SingleProcess`]).
    world: &'w dyn Collective,
    /// Time and bytes of this rank's exchange.
    exchange: ExchangeStats,
    output_dir: PathBuf,
    /// The checkpoint `--resume` continues from: `(step, folder)`.
    resume_from: Option<(u64, PathBuf)>,
    model: Model,
    model_config: crate::model::config::ModelConfig,
    /// `model.reference`, when set; else the policy with adapters bypassed is the reference.
    separate_ref: Option<Model>,
    /// The live diagnostics' prompts and reference completions (rank 0, with an eval split and
    /// `training.diagnostic_prompts > 0`).
    diagnostics: Option<diagnostics::Diagnostics>,
    adapter: AnyAdapterSet,
    /// The adapter's trainable tensors, by name.
    params: Vec<(String, Var)>,
    rows: Rows,
    splits: Splits,
    pad: u32,
    sampler: SamplerConfig,
    steps_per_epoch: usize,
    total_steps: u64,
    schedule: LrSchedule,
}

impl Setup<'_> {
    /// The model the reference log-probs come from (run with adapters bypassed).
    fn reference(&self) -> &Model {
        self.separate_ref.as_ref().unwrap_or(&self.model)
    }
}

/// Data rows (fails fast on bad files), the checkpoint to resume from, model, adapter, tokens,
/// schedule.
fn setup<'w>(cfg: &RunConfig, opts: &TrainOptions, world: &'w dyn Collective) -> Result<Setup<'w>> {
    let t = &cfg.training;
    // the device first (a GPU that cannot be opened fails before any reading), once for both models
    let device = cfg.model.device.open()?;
    let rows = read_rows(&cfg.data)?;
    let output_dir = opts.resume.clone().unwrap_or_else(|| PathBuf::from(&t.output_dir));
    let resume_from = match &opts.resume {
        Some(dir) => Some(checkpoint::latest_complete(dir)?.ok_or_else(|| {
            Error::input(dir, None, "--resume: no complete checkpoint in this folder (checkpoints/step-N/)")
        })?),
        None => None,
    };
    if world.size() > 1 {
        let resume_step = resume_from.as_ref().map(|r| r.0);
        let print = crate::model::fingerprint::run_fingerprint(&cfg.to_toml_string(), &cfg.model.path_or_id, cfg.model.reference.as_deref(), &cfg.model.revision, resume_step)?;
        check_same(world, &print, "config, model files or resume checkpoint")?;
    }
    let loaded = load_model(&cfg.model.path_or_id, cfg, &device)?;
    let (mut model, tokenizer, model_config) = (loaded.model, loaded.tokenizer, loaded.config);
    let separate_ref = match &cfg.model.reference {
        Some(r) => Some(load_model(r, cfg, &device)?.model),
        None => None,
    };
    let adapter = attach_adapter(&mut model, cfg)?;
    let params: Vec<(String, Var)> = adapter.vars();
    let splits = tokenize_splits(&cfg.data, &rows, &tokenizer)?;
    let pad = pad_id(&tokenizer)?;
    if t.diagnostic_prompts > 0 && splits.eval.is_empty() {
        return Err(Error::Config("training.diagnostic_prompts needs held-out prompts: set data.eval_file, data.eval_rows or data.eval_split (or training.diagnostic_prompts = 0)".into()));
    }
    let diagnostics = match (world.is_main(), t.diagnostic_prompts) {
        (true, n) if n > 0 => {
            let reference = separate_ref.as_ref().unwrap_or(&model);
            let prompts = splits.eval.iter().map(|p| p.prompt_ids.as_slice());
            Some(diagnostics::Diagnostics::new(reference, &tokenizer, prompts, n, t.diagnostic_max_new_tokens)?)
        }
        _ => None,
    };

    // the schedule
    let sampler = SamplerConfig { batch_size: t.per_device_train_batch_size, seed: t.seed, mega_batch_factor: 50, drop_last: false };
    let batches_per_epoch = splits.train.len().div_ceil(sampler.batch_size);
    // a step: GA micro-batches on every rank (HF Trainer's global batch)
    let steps_per_epoch = batches_per_epoch.div_ceil(t.gradient_accumulation_steps * world.size()).max(1);
    let total_steps = t.total_steps(steps_per_epoch) as u64;
    let schedule = t.lr_schedule(total_steps as usize);
    Ok(Setup { world, exchange: ExchangeStats::default(), output_dir, resume_from, model, model_config, separate_ref, diagnostics, adapter, params, rows, splits, pad, sampler, steps_per_epoch, total_steps, schedule })
}

/// The setup summary on stderr: model, reference, adapter, data, tokens per step, schedule.
fn print_summary(cfg: &RunConfig, s: &Setup) {
    let t = &cfg.training;
    let (rows, splits) = (&s.rows, &s.splits);
    say(&format!("ropo train: model {} ({} layers, hidden {}), {} threads", cfg.model.path_or_id, s.model_config.num_hidden_layers, s.model_config.hidden_size, rayon::current_num_threads()));
    if let Some(r) = &cfg.model.reference {
        say(&format!("reference model: {r} (separate)"));
    } else {
        say("reference model: the policy with adapters bypassed");
    }
    say(&format!("{}", s.adapter.report()));
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
    let ranks = s.world.size();
    let pairs_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * ranks;
    say(&format!(
        "tokens per step: {pairs_per_step} pairs ({} x {} accumulation{}) = {} sequences, ~{:.0} real tokens (at most {})",
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        if ranks == 1 { String::new() } else { format!(" x {ranks} ranks") },
        2 * pairs_per_step,
        mean_tokens * pairs_per_step as f64,
        2 * pairs_per_step * cfg.data.max_length
    ));
    say(&format!(
        "{} steps ({} per epoch), loss {}, beta {}, lr {} ({:?}, {} warmup), max_grad_norm {}",
        s.total_steps, s.steps_per_epoch, t.loss_type, t.beta, t.learning_rate, t.lr_scheduler_type, s.schedule.warmup_steps, t.max_grad_norm
    ));
}

/// A fresh run's output folder: emptied or created ([`checkpoint::prepare_output_dir`]), the
/// resolved config written at its top.
fn start_output_dir(cfg: &RunConfig, output_dir: &Path) -> Result<()> {
    checkpoint::prepare_output_dir(output_dir, cfg.training.overwrite)?;
    crate::fsutil::write_atomic(&output_dir.join(RUN_CONFIG_FILE), cfg.to_toml_string().as_bytes())
        .map_err(|e| Error::input(output_dir.join(RUN_CONFIG_FILE), None, format!("writing: {e}")))
}

/// The reference log-probs computed before the loop.
struct Refs {
    /// Every training pair's, with `training.precompute_ref_log_probs` (else each micro-batch
    /// runs the reference).
    train: Option<PairRefLogps>,
    /// Every evaluation pair's (when there is an eval split).
    eval: Option<PairRefLogps>,
}

/// The training pairs' reference log-probs (with `precompute_ref_log_probs`: from the cache in
/// `OUTPUT_DIR/reference_logps/` when its key matches, else computed and cached) and the
/// evaluation pairs'.
fn reference_logps(cfg: &RunConfig, s: &Setup) -> Result<Refs> {
    let t = &cfg.training;
    let train = if t.precompute_ref_log_probs {
        let (template, ld) = (template_override(&cfg.data)?.unwrap_or_default(), t.ld_alpha.map(|a| format!("ld_alpha {a:?}")));
        let mut parts = vec![
            cfg.model.path_or_id.clone(),
            cfg.model.reference.clone().unwrap_or_default(),
            cfg.model.revision.clone(),
            format!("{:?}", cfg.model.dtype),
            format!("{:?}", tokenize_options(&cfg.data)),
            template,
            format!("batch {}", t.per_device_eval_batch_size),
            format!("share_prompt {}", t.share_prompt),
        ];
        // LD-DPO weights the reference's sums too (a part only when set: older caches keep their key)
        parts.extend(ld);
        let key = reference::cache_key(&parts.iter().map(String::as_str).collect::<Vec<_>>(), &s.splits.train);
        let path = reference::cache_path(&s.output_dir.join(REFERENCE_DIR), &key);
        let cached = if s.world.is_main() { reference::load_cache(&path, s.splits.train.len())? } else { None };
        match parallel::from_main(s.world, &s.exchange, cached)? {
            Some(r) => {
                say(&format!("reference log-probs: cached ({})", path.display()));
                Some(r)
            }
            None => {
                say(&format!("reference log-probs: computing for {} pairs", s.splits.train.len()));
                let r = parallel::reference_logps(s.world, &s.exchange, s.reference(), &s.splits.train, t.per_device_eval_batch_size, s.pad, t.share_prompt, t.ld_alpha)?;
                if s.world.is_main() {
                    reference::save_cache(&path, &r)?;
                }
                Some(r)
            }
        }
    } else {
        None
    };
    let eval = match s.splits.eval.is_empty() {
        true => None,
        false => Some(parallel::reference_logps(s.world, &s.exchange, s.reference(), &s.splits.eval, t.per_device_eval_batch_size, s.pad, t.share_prompt, t.ld_alpha)?),
    };
    Ok(Refs { train, eval })
}

/// What the loop changes: the optimiser, the RNG, the trainer state, the data position and the
/// step (a checkpoint holds them all), the metrics file and the clock.
struct State {
    opt: AdamW,
    /// The training RNG: checkpointed with the run; nothing samples from it yet (no dropout).
    rng: ChaCha8Rng,
    trainer: TrainerState,
    cursor: DataCursor,
    /// Optimiser steps done.
    step: u64,
    /// `metrics.jsonl`, on rank 0 only.
    logger: Option<MetricsLogger>,
    clock: Clock,
}

impl State {
    /// Append `rec` to `metrics.jsonl` and to the trainer state's log history.
    fn log(&mut self, rec: crate::metrics::Record) -> Result<()> {
        if let Some(l) = &mut self.logger {
            l.log(&rec)?;
        }
        self.trainer.log_history.push(rec);
        Ok(())
    }
}

/// The loop's state at its start: fresh (AdamW moments zero, the RNG seeded, step 0, a new
/// `metrics.jsonl`), or restored from the `--resume` checkpoint (adapter, optimiser, RNG, data
/// position, trainer state; `metrics.jsonl` cut back to its step).
fn restore(cfg: &RunConfig, s: &Setup) -> Result<State> {
    let t = &cfg.training;
    let mut opt = AdamW::new(s.params.clone(), t.adamw())?;
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed);
    let mut trainer = TrainerState {
        max_steps: s.total_steps,
        num_train_epochs: t.num_train_epochs,
        logging_steps: t.logging_steps as u64,
        eval_steps: t.eval_steps as u64,
        save_steps: t.save_steps as u64,
        train_batch_size: t.per_device_train_batch_size as u64,
        ..Default::default()
    };
    let mut pos = DataPosition::default();
    let mut step: u64 = 0;
    let metrics_path = s.output_dir.join(METRICS_FILE);
    let logger = if let Some((at, dir)) = &s.resume_from {
        // onto the model's device (`model.device`), where the trainable tensors live
        let ck = checkpoint::load(dir, s.model.device())?;
        check_global_batch(cfg, s.world.size(), dir, &ck)?;
        ck.restore_trainable(&s.params)?;
        ck.restore_optimizer(&mut opt)?;
        rng = ck.meta.rng.restore()?;
        pos = ck.meta.data;
        step = ck.meta.global_step;
        trainer = ck.trainer_state.clone();
        trainer.max_steps = s.total_steps;
        say(&format!("resuming from {} (step {at})", dir.display()));
        s.world.is_main().then(|| MetricsLogger::resume(&metrics_path, step)).transpose()?
    } else {
        s.world.is_main().then(|| MetricsLogger::create(&metrics_path)).transpose()?
    };
    let lengths: Vec<usize> = s.splits.train.iter().map(|p| p.max_len()).collect();
    let cursor = DataCursor::new(lengths, s.sampler, pos);
    let clock = Clock::continuing(&trainer);
    Ok(State { opt, rng, trainer, cursor, step, logger, clock })
}

/// A checkpoint of another rank count resumes only with the same global batch (pairs a step:
/// batch size x accumulation x ranks), or its data position and schedule would mean other steps.
/// Errors: the two global batches, with the accumulation that would match.
fn check_global_batch(cfg: &RunConfig, ranks: usize, dir: &Path, ck: &checkpoint::LoadedCheckpoint) -> Result<()> {
    let ranks_then = ck.meta.ranks.max(1) as usize;
    if ranks_then == ranks {
        return Ok(());
    }
    let then = RunConfig::from_toml_str(&ck.config_toml, &dir.join(RUN_CONFIG_FILE))?.training;
    let t = &cfg.training;
    let (global_then, global_now) = (then.per_device_train_batch_size * then.gradient_accumulation_steps * ranks_then, t.per_device_train_batch_size * t.gradient_accumulation_steps * ranks);
    if global_then == global_now {
        return Ok(());
    }
    let hint = match global_then % (t.per_device_train_batch_size * ranks) {
        0 => format!("; training.gradient_accumulation_steps = {} gives it", global_then / (t.per_device_train_batch_size * ranks)),
        _ => String::new(),
    };
    Err(Error::Msg(format!(
        "--resume {}: the checkpoint was trained by {ranks_then} rank(s) with a global batch of {global_then} pairs \
         ({} x {} accumulation x {ranks_then}); this run of {ranks} rank(s) has {global_now} ({} x {} x {ranks}): \
         resume with the same global batch{hint}",
        dir.display(),
        then.per_device_train_batch_size,
        then.gradient_accumulation_steps,
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
    )))
}

/// Evaluate the policy on the eval split (when there is one) at the current step; print the
/// line with `print` and log the record.
fn eval_and_log(cfg: &RunConfig, s: &Setup, refs: &Refs, st: &mut State, print: impl Fn(&str)) -> Result<Option<EvalStats>> {
    let t = &cfg.training;
    let Some(eval_refs) = &refs.eval else { return Ok(None) };
    let t0 = Instant::now();
    let (loss, rewards, terms, tokens) = evaluate_in(s.world, &s.exchange, &s.model, &s.splits.eval, eval_refs, t.per_device_eval_batch_size, s.pad, t)?;
    let secs = t0.elapsed().as_secs_f64();
    let diagnostics = match &s.diagnostics {
        Some(d) => d.measure(s.reference(), &s.model, true, t.per_device_eval_batch_size)?,
        None => vec![],
    };
    let (step, epoch) = (st.step, st.trainer.epoch);
    let e = EvalStats { step, epoch, loss, rewards, terms: logged_terms(terms), diagnostics, tokens_per_second: tokens as f64 / secs.max(1e-9), elapsed_seconds: st.clock.elapsed() };
    // the ranks other than 0 print nothing (their progress bar is hidden, not silent)
    let print = |l: &str| if s.world.is_main() { print(l) };
    print(&format!("eval at step {step}: loss {:.4}, rewards/accuracies {:.3}, rewards/ties {:.3}, rewards/margins {:.4}", e.loss, e.rewards.rewards_accuracies, e.rewards.rewards_ties, e.rewards.rewards_margins));
    if !e.diagnostics.is_empty() {
        let d: Vec<String> = e.diagnostics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        let (n, tokens) = s.diagnostics.as_ref().map_or((0, 0), |d| (d.len(), d.tokens()));
        print(&format!("  diagnostics ({n} held-out prompts, {tokens} reference tokens): {}", d.join(", ")));
    }
    st.log(e.record())?;
    Ok(Some(e))
}

/// Log the means over a logging interval (`metrics.jsonl`, the progress bar).
fn log_interval(st: &mut State, interval: &Interval, lr: f64, progress: &Progress) -> Result<()> {
    let n = interval.steps.max(1) as f64;
    let secs = interval.start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let stats = TrainStats {
        step: st.step,
        epoch: st.trainer.epoch,
        loss: interval.loss / n,
        rewards: scale_metrics(&interval.metrics, 1.0 / n),
        terms: logged_terms(interval.terms.iter().map(|&(k, v)| (k, v / n)).collect()),
        grad_norm: interval.grad_norm / n,
        learning_rate: lr,
        tokens_per_second: interval.tokens as f64 / secs.max(1e-9),
        elapsed_seconds: st.clock.elapsed(),
    };
    st.log(stats.record())?;
    progress.update(st.step, stats.loss, stats.rewards.rewards_accuracies, stats.rewards.rewards_margins, stats.tokens_per_second);
    Ok(())
}

/// Write the checkpoint of the current step (then prune to `save_total_limit` and write
/// `trainer_state.json`); rank 0 only. Returns its folder.
fn save_checkpoint(cfg: &RunConfig, s: &Setup, st: &State) -> Result<PathBuf> {
    if !s.world.is_main() {
        return Ok(checkpoint::step_dir(&s.output_dir, st.step));
    }
    let meta = CheckpointMeta {
        format_version: checkpoint::FORMAT_VERSION,
        global_step: st.step,
        scheduler_step: st.step,
        total_steps: s.total_steps,
        rng: RngState::capture(&st.rng),
        data: st.cursor.pos,
        ropo_version: env!("CARGO_PKG_VERSION").into(),
        ranks: s.world.size() as u64,
    };
    let data = CheckpointData { trainable: &s.params, optimizer: &st.opt, meta, config: cfg, trainer_state: &st.trainer };
    let dir = checkpoint::save(&s.output_dir, &data)?;
    checkpoint::prune(&s.output_dir, cfg.training.save_total_limit)?;
    st.trainer.save(&s.output_dir.join(TRAINER_STATE_FILE))?;
    Ok(dir)
}

/// The end of a finished run: the final adapter, `trainer_state.json`, the training curves
/// (reported, never fatal).
fn write_final(s: &Setup, st: &State) -> Result<()> {
    save_adapter(&s.output_dir, &s.adapter)?;
    st.trainer.save(&s.output_dir.join(TRAINER_STATE_FILE))?;
    let curves = s.output_dir.join(CURVES_FILE);
    match crate::plot::plot_metrics_file(&s.output_dir.join(METRICS_FILE), &curves) {
        Ok(_) => say(&format!("training curves written to {}", curves.display())),
        Err(e) => say(&format!("warning: training curves not written: {e}")),
    }
    Ok(())
}

/// Training time: this process's loop, plus (after `--resume`) the checkpoint's last
/// `elapsed_seconds`, so the figure is the run's training time so far (the time between that
/// record and the kill is not counted).
struct Clock {
    start: Instant,
    before: f64,
}

impl Clock {
    fn continuing(state: &TrainerState) -> Self {
        let before = state.log_history.iter().rev().find_map(|r| r.get("elapsed_seconds").and_then(|v| v.as_f64())).unwrap_or(0.0);
        Self { start: Instant::now(), before }
    }

    fn elapsed(&self) -> f64 {
        self.before + self.start.elapsed().as_secs_f64()
    }
}

/// One line on stderr (none on the ranks other than 0).
fn say(s: &str) {
    if !QUIET.load(Ordering::SeqCst) {
        eprintln!("{s}");
    }
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
}

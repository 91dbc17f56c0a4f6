//! The training run's TOML configuration: `[model]`, `[data]`, `[adapter]`, `[training]`.
//!
//! Strict for our own file: an unknown key is an error naming the file, line and the nearest
//! valid key (`run.toml:14: unknown key training.betta; did you mean training.beta?`). Values
//! are checked by [`RunConfig::validate`], whose messages name the key and the value
//! (`training.beta must be > 0 (got -0.1)`). `--set training.beta=0.2` overrides a key (dotted
//! path; the value is parsed as TOML, and taken as a string when it is not valid TOML).
//! Every default lives in one `Default` impl per section; [`RunConfig::to_toml_string`] prints
//! every key (`ropo train --print-config`). Names follow TRL's `DPOConfig` / HF
//! `TrainingArguments` wherever one exists.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::data::splits::{DataSection, RowSlice, TemplateSource};
use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::logps::LogpOptions;
use crate::loss::{LossParams, LossSpec, LossType, LossTypes};
use crate::optim::{AdamWConfig, LrSchedule, LrScheduler};

/// The whole run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The model to train and its reference.
    pub model: ModelSection,
    /// The preference data.
    pub data: DataSection,
    /// The adapter put on the model.
    pub adapter: AdapterSection,
    /// Loss, optimiser, schedule, logging and checkpointing.
    pub training: TrainingSection,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// An HF model folder, a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) or a `.gguf` file.
    pub path_or_id: String,
    /// Hub revision (branch, tag or commit) when `path_or_id` is a hub id.
    pub revision: String,
    /// Storage and product dtype of the frozen projection weights: `f32`, or `bf16` (weights
    /// rounded to bf16, products on the AVX-512 BF16 kernel with f32 accumulation; activations,
    /// norms, attention, adapters, gradients and the optimiser stay f32). `f16` is refused.
    pub dtype: ModelDtype,
    /// A separate reference model (same forms as `path_or_id`). Unset: the policy with its
    /// adapters bypassed is the reference (no second copy of the weights).
    pub reference: Option<String>,
    /// Where the model, adapters and optimiser live: `cpu` (default), `cuda` or `cuda:N`
    /// (a build with the cargo feature `cuda`; README "GPU"). `ropo train --device` overrides it.
    pub device: DeviceSpec,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { path_or_id: String::new(), revision: "main".into(), dtype: ModelDtype::F32, reference: None, device: DeviceSpec::Cpu }
    }
}

/// Dtype of the frozen projection weights (see [`ModelSection::dtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelDtype {
    F32,
    Bf16,
    F16,
}

/// `[adapter]`: which adapter to train and its options.
///
/// `type = "ropo"` (default; `../shared/docs/ropo-method.md`) uses `householder_reflections`,
/// `givens_stages`, `magnitude`; `type = "lora"` (PEFT's LoRA) uses `lora_r`, `lora_alpha`,
/// `lora_dropout`; `type = "full"` trains the selected weights themselves. `target_modules` and
/// `init_seed` are shared; the options of the other kinds are ignored (but still type-checked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSection {
    /// The adapter kind.
    #[serde(rename = "type")]
    pub kind: AdapterKind,
    /// RoPO: r, the number of Householder reflections (even; 0 = Givens only).
    pub householder_reflections: usize,
    /// RoPO: S, the number of brick-wall Givens stages (0 = Householder only).
    pub givens_stages: usize,
    /// RoPO: train a per-neuron magnitude `m`.
    pub magnitude: bool,
    /// LoRA: the rank r (> 0), PEFT `r`.
    pub lora_r: usize,
    /// LoRA: alpha (> 0), PEFT `lora_alpha`; the update is scaled by `lora_alpha / lora_r`.
    pub lora_alpha: f64,
    /// LoRA: dropout probability on the LoRA branch's input, PEFT `lora_dropout`. Only 0 is
    /// supported for now (a value > 0 is a config error).
    pub lora_dropout: f64,
    /// Which linears to adapt: module names (`q_proj`, matched against the last path
    /// component), regexes over full module paths, or `["all-linear"]` (every linear of the
    /// decoder layers, not `lm_head`, as PEFT's `"all-linear"`).
    pub target_modules: Vec<String>,
    /// Seed of the adapter's random initialization (RoPO's Householder vectors, LoRA's A).
    pub init_seed: u64,
}

impl Default for AdapterSection {
    /// The spec's defaults: RoPO with r = 4, S = 2, magnitude on, q/k/v/o projections; PEFT's
    /// LoRA defaults r = 8, alpha = 16, dropout 0.
    fn default() -> Self {
        Self {
            kind: AdapterKind::Ropo,
            householder_reflections: 4,
            givens_stages: 2,
            magnitude: true,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
            init_seed: 0,
        }
    }
}

/// The adapter kind (`adapter.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    /// Householder × Givens rotations with a magnitude (RoPO).
    Ropo,
    /// LoRA as PEFT defines it: `W x + b + (alpha / r) B A x`.
    Lora,
    /// Full-parameter training of the selected linears' weights and biases.
    Full,
}

impl AdapterKind {
    /// `"ropo"`, `"lora"` or `"full"` (as written in the config).
    pub fn as_str(&self) -> &'static str {
        match self {
            AdapterKind::Ropo => "ropo",
            AdapterKind::Lora => "lora",
            AdapterKind::Full => "full",
        }
    }
}

/// The special `target_modules` value selecting every linear of the decoder layers (PEFT's).
pub const ALL_LINEAR: &str = "all-linear";

/// `[training]` (TRL `DPOConfig` / HF `TrainingArguments` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    /// Where the adapter, checkpoints, metrics and resolved config go.
    pub output_dir: String,
    /// Replace an output folder holding another run.
    pub overwrite: bool,
    /// The loss: one name (`"sigmoid"`, ...) or a list of names summed with `loss_weights`, as
    /// TRL 1.x (e.g. MPO: `["sigmoid", "bco_pair", "sft"]`); `"sft"` is the NLL of the chosen
    /// completions.
    pub loss_type: LossTypes,
    /// One weight per `loss_type` entry (same length); unset: all 1.0.
    pub loss_weights: Option<Vec<f64>>,
    /// β (> 0).
    pub beta: f64,
    /// ε of the `robust` and `exo_pair` losses (0 for the others).
    pub label_smoothing: f64,
    /// τ of the `discopop` loss (> 0).
    pub discopop_tau: f64,
    /// Weight of the SFT (NLL on chosen) term (RPO); unset: no SFT term. The same as appending
    /// `"sft"` to `loss_type` with this weight (TRL 1.x removed `rpo_alpha` for that).
    pub rpo_alpha: Option<f64>,
    /// LD-DPO's α in [0, 1] (TRL `ld_alpha`): completion tokens past the pair's shared length
    /// count α times in the policy and reference log-probs; unset: plain sums (= 1.0).
    pub ld_alpha: Option<f64>,
    /// WPO (TRL `use_weighting`): weight each pair's loss terms by the policy's length-normalised
    /// probability of both completions, `exp(mean_t(log p_t - log Σ_v p_v²))`, without gradient.
    pub use_weighting: bool,
    /// Peak learning rate (> 0). TRL's 1e-6 default is for full fine-tuning; adapters need more.
    pub learning_rate: f64,
    /// Decay after warmup: `constant`, `linear` or `cosine`.
    pub lr_scheduler_type: LrScheduler,
    /// Warmup steps; when 0, `warmup_ratio` of the total steps (rounded up) is used.
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total steps, in [0, 1).
    pub warmup_ratio: f64,
    /// AdamW decoupled weight decay (>= 0).
    pub weight_decay: f64,
    /// AdamW β₁, in [0, 1).
    pub adam_beta1: f64,
    /// AdamW β₂, in [0, 1).
    pub adam_beta2: f64,
    /// AdamW ε (> 0).
    pub adam_epsilon: f64,
    /// Clip gradients to this global L2 norm; 0 disables clipping (the norm is still logged).
    pub max_grad_norm: f64,
    /// Pairs per micro-batch (each pair is two sequences).
    pub per_device_train_batch_size: usize,
    /// Pairs per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the training rows (fractions allowed, as HF); ignored when `max_steps > 0`.
    pub num_train_epochs: f64,
    /// Total optimiser steps; -1: from `num_train_epochs`.
    pub max_steps: i64,
    /// Seed of data order and anything random in training.
    pub seed: u64,
    /// Log metrics every this many optimiser steps (>= 1).
    pub logging_steps: usize,
    /// Evaluate every this many steps (the eval set is also evaluated before training and at
    /// the end); 0: before training and at the end only.
    pub eval_steps: usize,
    /// Live reward-hacking diagnostics at every evaluation: the first this many distinct held-out prompts (eval split) that leave room for `diagnostic_max_new_tokens` in the context are completed greedily by the reference once (an error without an eval split); each evaluation logs the policy's per-token KL(reference || policy) and NLL on those completions (`eval/drift/kl`, `eval/drift/nll`) and its own greedy answers' length as `ropo eval` counts it (`eval/greedy/mean_length`, `eval/greedy/hit_max_new_tokens`); 0: off.
    pub diagnostic_prompts: usize,
    /// New tokens of the diagnostics' greedy completions (reference and policy).
    pub diagnostic_max_new_tokens: usize,
    /// Write a checkpoint every this many steps; 0: only at the end (and on Ctrl-C).
    pub save_steps: usize,
    /// Keep at most this many checkpoints (the newest); 0: keep all.
    pub save_total_limit: usize,
    /// Compute the reference log-probs once before training and cache them on disk.
    pub precompute_ref_log_probs: bool,
    /// Run each pair's prompt once (prefix sharing: both completions attend to its keys and values) for the policy, the reference and evaluation; false: the concatenated rows, prompt twice. A batch whose chosen and rejected prompts differ or are empty falls back to the concatenated rows (never for ropo's own tokenization).
    pub share_prompt: bool,
    /// Compute threads; 0: all cores.
    pub threads: usize,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            output_dir: "ropo-output".into(),
            overwrite: false,
            loss_type: LossTypes::one(LossType::Sigmoid),
            loss_weights: None,
            beta: 0.1,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            rpo_alpha: None,
            ld_alpha: None,
            use_weighting: false,
            learning_rate: 5e-5,
            lr_scheduler_type: LrScheduler::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            per_device_train_batch_size: 2,
            per_device_eval_batch_size: 2,
            gradient_accumulation_steps: 1,
            num_train_epochs: 1.0,
            max_steps: -1,
            seed: 42,
            logging_steps: 1,
            eval_steps: 0,
            diagnostic_prompts: 0,
            diagnostic_max_new_tokens: 64,
            save_steps: 50,
            save_total_limit: 2,
            precompute_ref_log_probs: false,
            share_prompt: true,
            threads: 0,
        }
    }
}

impl TrainingSection {
    /// The loss hyperparameters.
    pub fn loss_params(&self) -> LossParams {
        LossParams { beta: self.beta, label_smoothing: self.label_smoothing, discopop_tau: self.discopop_tau }
    }

    /// The weighted loss terms (`loss_type`, `loss_weights`, `rpo_alpha`, `use_weighting`).
    pub fn loss_spec(&self) -> LossSpec {
        LossSpec::from_training(&self.loss_type, self.loss_weights.as_deref(), self.rpo_alpha, self.use_weighting)
    }

    /// What the log-prob passes compute besides the sums (`ld_alpha`, `use_weighting`).
    pub fn logp_options(&self) -> LogpOptions {
        LogpOptions { ld_alpha: self.ld_alpha, use_weighting: self.use_weighting }
    }

    /// The AdamW hyperparameters (the learning rate comes from [`TrainingSection::lr_schedule`]).
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.adam_beta1, beta2: self.adam_beta2, eps: self.adam_epsilon, weight_decay: self.weight_decay }
    }

    /// Total optimiser steps for `steps_per_epoch` steps per epoch: `max_steps` when > 0, else
    /// `ceil(num_train_epochs · steps_per_epoch)` (at least 1).
    pub fn total_steps(&self, steps_per_epoch: usize) -> usize {
        if self.max_steps > 0 {
            self.max_steps as usize
        } else {
            ((self.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
        }
    }

    /// The learning-rate schedule over `total_steps` (warmup from `warmup_steps`, else
    /// `ceil(warmup_ratio · total_steps)`, as HF).
    pub fn lr_schedule(&self, total_steps: usize) -> LrSchedule {
        let warmup = if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            crate::optim::warmup_steps_from_ratio(total_steps, self.warmup_ratio)
        };
        LrSchedule { peak: self.learning_rate, warmup_steps: warmup, total_steps, kind: self.lr_scheduler_type }
    }
}

// ------------------------------------------------------------------------------------------
// Keys, in print order (a test checks them against serde's field lists)
// ------------------------------------------------------------------------------------------

/// The sections, in print order.
pub const SECTIONS: [&str; 4] = ["model", "data", "adapter", "training"];
const MODEL_KEYS: &[&str] = &["path_or_id", "revision", "dtype", "reference", "device"];
const DATA_KEYS: &[&str] = &[
    "train_files",
    "eval_file",
    "split",
    "eval_split_name",
    "eval_split",
    "format",
    "max_length",
    "max_prompt_length",
    "chat_template",
    "train_rows",
    "eval_rows",
    "on_identical",
];
const ADAPTER_KEYS: &[&str] = &[
    "type",
    "householder_reflections",
    "givens_stages",
    "magnitude",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "init_seed",
];
const TRAINING_KEYS: &[&str] = &[
    "output_dir",
    "overwrite",
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "discopop_tau",
    "rpo_alpha",
    "ld_alpha",
    "use_weighting",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "seed",
    "logging_steps",
    "eval_steps",
    "diagnostic_prompts",
    "diagnostic_max_new_tokens",
    "save_steps",
    "save_total_limit",
    "precompute_ref_log_probs",
    "share_prompt",
    "threads",
];

/// The valid keys of a section.
pub fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    match section {
        "model" => Some(MODEL_KEYS),
        "data" => Some(DATA_KEYS),
        "adapter" => Some(ADAPTER_KEYS),
        "training" => Some(TRAINING_KEYS),
        _ => None,
    }
}

/// The nearest candidate within a third of the key's length (at least 2 edits), if any.
fn nearest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let best = candidates.iter().map(|c| (strsim::levenshtein(key, c), *c)).min()?;
    (best.0 <= (key.chars().count() / 3).max(2)).then_some(best.1)
}

/// `unknown key training.betta; did you mean training.beta?` (or the valid keys when nothing is close).
fn unknown_key_message(section: Option<&str>, key: &str) -> String {
    match section {
        None => match nearest(key, &SECTIONS) {
            Some(s) => format!("unknown section [{key}]; did you mean [{s}]?"),
            None => format!("unknown section [{key}]; valid sections: {}", SECTIONS.join(", ")),
        },
        Some(sec) => {
            let keys = section_keys(sec).unwrap_or(&[]);
            match nearest(key, keys) {
                Some(k) => format!("unknown key {sec}.{key}; did you mean {sec}.{k}?"),
                None => format!("unknown key {sec}.{key}; valid keys of [{sec}]: {}", keys.join(", ")),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Loading
// ------------------------------------------------------------------------------------------

impl RunConfig {
    /// Read `path` (or start from the defaults when `None`), apply `--set key=value` overrides,
    /// and validate.
    ///
    /// Errors: an unreadable file; TOML syntax, unknown keys and wrong types as
    /// `FILE:LINE: message`; a bad override naming it; every invalid value (all at once).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (mut cfg, text) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::input(p, None, format!("reading config: {e}")))?;
                (Self::from_toml_str(&text, p)?, Some(text))
            }
            None => (Self::default(), None),
        };
        if !overrides.is_empty() {
            cfg = cfg.with_overrides(overrides)?;
        }
        cfg.validate().map_err(|e| match (e, path, text) {
            (Error::Config(msg), Some(p), Some(text)) => Error::Config(locate_value_errors(&msg, &text, p, overrides)),
            (e, ..) => e,
        })?;
        Ok(cfg)
    }

    /// Parse a config document; `source` names it in errors. Does not validate values.
    pub fn from_toml_str(text: &str, source: &Path) -> Result<Self> {
        // Check the keys first, so an unknown key gets a suggestion and the line of the key.
        check_keys(text, source)?;
        toml::from_str::<RunConfig>(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let key = line.and_then(|l| key_on_line(text, l));
            let msg = e.message().trim().to_string();
            let msg = match key {
                Some(k) if !msg.contains(&k) => format!("{k}: {msg}"),
                _ => msg,
            };
            Error::input(source, line, msg)
        })
    }

    /// Apply `--set section.key=value` overrides. The value is parsed as a TOML value
    /// (`0.2`, `true`, `["a", "b"]`, `"text"`); when it is not valid TOML it is taken as a string
    /// (`--set model.path_or_id=HuggingFaceTB/SmolLM2-135M-Instruct`).
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self> {
        let mut table = toml::Table::try_from(self).map_err(|e| Error::Config(format!("internal: {e}")))?;
        for ov in overrides {
            let (key, raw) =
                ov.split_once('=').ok_or_else(|| Error::Config(format!("--set {ov}: expected section.key=value")))?;
            let key = key.trim();
            let (section, field) =
                key.split_once('.').ok_or_else(|| Error::Config(format!("--set {ov}: expected section.key=value")))?;
            let keys = section_keys(section).ok_or_else(|| Error::Config(format!("--set {ov}: {}", unknown_key_message(None, section))))?;
            if !keys.contains(&field) {
                return Err(Error::Config(format!("--set {ov}: {}", unknown_key_message(Some(section), field))));
            }
            let value = match toml::from_str::<toml::Table>(&format!("v = {}", raw.trim())) {
                Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
                Err(_) => toml::Value::String(raw.trim().to_string()),
            };
            let sec = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let sec = sec.as_table_mut().ok_or_else(|| Error::Config(format!("--set {ov}: [{section}] is not a table")))?;
            sec.insert(field.to_string(), value.clone());
            // Type-check this override on its own, so the error names it.
            toml::Value::Table(table.clone())
                .try_into::<RunConfig>()
                .map_err(|e| Error::Config(format!("--set {ov}: {}", e.message().trim())))?;
        }
        toml::Value::Table(table).try_into::<RunConfig>().map_err(|e| Error::Config(format!("--set: {}", e.message().trim())))
    }

    /// Check every value; all problems are reported at once, one per line, each naming the key
    /// and the value: `training.beta must be > 0 (got -0.1)`.
    pub fn validate(&self) -> Result<()> {
        let mut c = Checks::default();
        check_model(&self.model, &mut c);
        check_data(&self.data, &mut c);
        check_adapter(&self.adapter, self.model.dtype, &mut c);
        check_training(&self.training, &mut c);
        if c.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(c.0.join("\n")))
        }
    }

    /// The config as TOML with every key: set keys as `key = value`, unset optional keys as a
    /// comment (`# reference = (unset)`). Parses back to the same config.
    pub fn to_toml_string(&self) -> String {
        let table = toml::Table::try_from(self).expect("a RunConfig always serialises to TOML");
        let mut out = String::new();
        for (i, section) in SECTIONS.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&format!("[{section}]\n"));
            let sec = table.get(*section).and_then(|v| v.as_table());
            for key in section_keys(section).unwrap_or(&[]) {
                match sec.and_then(|s| s.get(*key)) {
                    Some(v) => out.push_str(&format!("{key} = {v}\n")),
                    None => out.push_str(&format!("# {key} = (unset)\n")),
                }
            }
        }
        out
    }
}

/// The problems found by [`RunConfig::validate`], in the order they were found.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    /// Record `msg` unless `ok`.
    fn check(&mut self, ok: bool, msg: String) {
        if !ok {
            self.0.push(msg);
        }
    }
}

/// The `[model]` checks of [`RunConfig::validate`].
fn check_model(m: &ModelSection, c: &mut Checks) {
    c.check(!m.path_or_id.trim().is_empty(), "model.path_or_id must be set (an HF folder, a hub id or a .gguf file)".into());
    c.check(!m.revision.trim().is_empty(), "model.revision must not be empty (default \"main\")".into());
    if let Some(r) = &m.reference {
        c.check(!r.trim().is_empty(), "model.reference must not be empty when set".into());
    }
    if let Some(why) = m.device.unavailable_in_this_build() {
        c.check(false, format!("model.device = \"{}\": {why}", m.device));
    }
    c.check(
        m.dtype != ModelDtype::F16,
        "model.dtype = \"f16\" is not supported on the CPU (no f16 matmul kernel: slower than f32, and f16's range overflows in activations); use \"bf16\" (bf16 products, f32 accumulation) or \"f32\"".into(),
    );
}

/// The `[data]` checks of [`RunConfig::validate`].
fn check_data(d: &DataSection, c: &mut Checks) {
    c.check(!d.train_files.is_empty(), "data.train_files must list at least one file".into());
    for (i, f) in d.train_files.iter().enumerate() {
        c.check(!f.trim().is_empty(), format!("data.train_files[{i}] is empty"));
    }
    if let Some(s) = d.eval_split {
        c.check(s > 0.0 && s < 1.0, format!("data.eval_split must be in (0, 1) (got {s})"));
        c.check(d.eval_file.is_none(), "data.eval_split and data.eval_file are exclusive".into());
        c.check(d.eval_rows.is_none(), "data.eval_split and data.eval_rows are exclusive".into());
        c.check(d.eval_split_name.is_none(), "data.eval_split and data.eval_split_name are exclusive".into());
    }
    c.check(!d.split.trim().is_empty(), "data.split must not be empty".into());
    if let Some(s) = &d.eval_split_name {
        c.check(!s.trim().is_empty(), "data.eval_split_name must not be empty when set".into());
    }
    c.check(d.max_length >= 2, format!("data.max_length must be >= 2 (got {})", d.max_length));
    if let Some(p) = d.max_prompt_length {
        c.check(p >= 1 && p < d.max_length, format!("data.max_prompt_length must be in [1, data.max_length = {}) (got {p})", d.max_length));
    }
    if let Some(t) = &d.chat_template {
        c.check(!t.trim().is_empty(), "data.chat_template must not be empty when set".into());
    }
}

/// The `[adapter]` checks of [`RunConfig::validate`] (`dtype`: the model's, which a full
/// fine-tune needs in f32).
fn check_adapter(a: &AdapterSection, dtype: ModelDtype, c: &mut Checks) {
    c.check(!a.target_modules.is_empty(), "adapter.target_modules must list at least one module".into());
    for (i, t) in a.target_modules.iter().enumerate() {
        c.check(!t.trim().is_empty(), format!("adapter.target_modules[{i}] is empty"));
        if let Err(e) = regex::Regex::new(t) {
            c.check(false, format!("adapter.target_modules[{i}] is not a valid regex ({t:?}): {e}"));
        }
    }
    c.check(
        !a.target_modules.iter().any(|t| t == ALL_LINEAR) || a.target_modules.len() == 1,
        format!("adapter.target_modules: {ALL_LINEAR:?} must be the only entry (got {:?})", a.target_modules),
    );
    match a.kind {
        AdapterKind::Ropo => {
            c.check(
                a.householder_reflections % 2 == 0,
                format!("adapter.householder_reflections must be even (paired identity init) (got {})", a.householder_reflections),
            );
            c.check(
                a.householder_reflections > 0 || a.givens_stages > 0 || a.magnitude,
                "adapter has nothing to train: householder_reflections = 0, givens_stages = 0 and magnitude = false".into(),
            );
        }
        AdapterKind::Lora => {
            c.check(a.lora_r > 0, "adapter.lora_r must be > 0 (got 0)".into());
            c.check(a.lora_alpha > 0.0 && a.lora_alpha.is_finite(), format!("adapter.lora_alpha must be > 0 (got {})", a.lora_alpha));
            c.check(
                (0.0..1.0).contains(&a.lora_dropout),
                format!("adapter.lora_dropout must be in [0, 1) (got {})", a.lora_dropout),
            );
            c.check(
                !(a.lora_dropout > 0.0 && a.lora_dropout < 1.0),
                format!("adapter.lora_dropout > 0 is not supported yet (got {}); use 0", a.lora_dropout),
            );
        }
        AdapterKind::Full => {
            c.check(
                dtype != ModelDtype::Bf16,
                "adapter.type = \"full\" trains the weights themselves, in f32: model.dtype = \"bf16\" (frozen bf16 projections) does not apply; use model.dtype = \"f32\"".into(),
            );
        }
    }
}

/// The loss-list checks of [`check_training`]: `label_smoothing` against every pairwise loss
/// of the list (in range for each that reads it; 0 when none does), `loss_weights`' length and
/// values, `ld_alpha`'s range, `use_weighting` with AOT (refused, as TRL: AOT sorts the pairs).
fn check_loss_terms(t: &TrainingSection, c: &mut Checks) {
    let readers: Vec<LossType> = t.loss_type.pair_losses().filter(|l| l.reads_label_smoothing()).collect();
    let failed = match readers.as_slice() {
        [] if t.label_smoothing == 0.0 => None,
        [] => Some(match t.loss_type.pair_losses().next() {
            Some(l) => l.check_label_smoothing(t.label_smoothing).err().unwrap_or_default(),
            None => "must be 0 for loss_type \"sft\"".to_string(),
        }),
        some => some.iter().find_map(|l| l.check_label_smoothing(t.label_smoothing).err()),
    };
    if let Some(why) = failed {
        c.0.push(format!("training.label_smoothing {why} (got {})", t.label_smoothing));
    }
    if let Some(w) = &t.loss_weights {
        c.check(
            w.len() == t.loss_type.0.len(),
            format!("training.loss_weights must have one weight per loss_type entry ({} weights for {} loss types)", w.len(), t.loss_type.0.len()),
        );
        if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
            c.0.push(format!("training.loss_weights must be finite (got {bad})"));
        }
    }
    if let Some(a) = t.ld_alpha {
        c.check((0.0..=1.0).contains(&a), format!("training.ld_alpha must be in [0, 1] (got {a})"));
    }
    c.check(
        !(t.use_weighting && t.loss_spec().has_sft()),
        "training.use_weighting with an \"sft\" term (in loss_type or through rpo_alpha) is not supported: TRL 1.16 fails on that combination (an in-place product on its broadcast sft term), so there is no reference to match".into(),
    );
    c.check(
        !(t.use_weighting && (t.loss_type.contains(LossType::Aot) || t.loss_type.contains(LossType::AotUnpaired))),
        "training.use_weighting does not apply to loss_type \"aot\" or \"aot_unpaired\" (they sort the pairs, which would misalign the per-pair weights; TRL refuses it too)".into(),
    );
}

/// The `[training]` checks of [`RunConfig::validate`].
fn check_training(t: &TrainingSection, c: &mut Checks) {
    c.check(!t.output_dir.trim().is_empty(), "training.output_dir must not be empty".into());
    c.check(t.beta > 0.0 && t.beta.is_finite(), format!("training.beta must be > 0 (got {})", t.beta));
    check_loss_terms(t, c);
    c.check(t.discopop_tau > 0.0 && t.discopop_tau.is_finite(), format!("training.discopop_tau must be > 0 (got {})", t.discopop_tau));
    if let Some(alpha) = t.rpo_alpha {
        c.check(alpha >= 0.0 && alpha.is_finite(), format!("training.rpo_alpha must be >= 0 (got {alpha})"));
    }
    c.check(t.learning_rate > 0.0 && t.learning_rate.is_finite(), format!("training.learning_rate must be > 0 (got {})", t.learning_rate));
    c.check((0.0..1.0).contains(&t.warmup_ratio), format!("training.warmup_ratio must be in [0, 1) (got {})", t.warmup_ratio));
    c.check(
        t.warmup_steps == 0 || t.warmup_ratio == 0.0,
        format!("training.warmup_steps ({}) and training.warmup_ratio ({}) are exclusive: set one", t.warmup_steps, t.warmup_ratio),
    );
    c.check(t.weight_decay >= 0.0 && t.weight_decay.is_finite(), format!("training.weight_decay must be >= 0 (got {})", t.weight_decay));
    c.check((0.0..1.0).contains(&t.adam_beta1), format!("training.adam_beta1 must be in [0, 1) (got {})", t.adam_beta1));
    c.check((0.0..1.0).contains(&t.adam_beta2), format!("training.adam_beta2 must be in [0, 1) (got {})", t.adam_beta2));
    c.check(t.adam_epsilon > 0.0 && t.adam_epsilon.is_finite(), format!("training.adam_epsilon must be > 0 (got {})", t.adam_epsilon));
    c.check(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite(), format!("training.max_grad_norm must be >= 0 (got {})", t.max_grad_norm));
    c.check(t.per_device_train_batch_size >= 1, "training.per_device_train_batch_size must be >= 1 (got 0)".into());
    c.check(t.per_device_eval_batch_size >= 1, "training.per_device_eval_batch_size must be >= 1 (got 0)".into());
    c.check(t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps must be >= 1 (got 0)".into());
    c.check(
        t.num_train_epochs > 0.0 && t.num_train_epochs.is_finite(),
        format!("training.num_train_epochs must be > 0 (got {})", t.num_train_epochs),
    );
    c.check(t.max_steps == -1 || t.max_steps > 0, format!("training.max_steps must be -1 (use num_train_epochs) or > 0 (got {})", t.max_steps));
    c.check(t.logging_steps >= 1, "training.logging_steps must be >= 1 (got 0)".into());
    c.check(
        t.diagnostic_prompts == 0 || t.diagnostic_max_new_tokens >= 1,
        "training.diagnostic_max_new_tokens must be >= 1 when training.diagnostic_prompts > 0 (got 0)".into(),
    );
}

/// Prefix each line of a [`RunConfig::validate`] message (`training.beta must be > 0 ...`)
/// with where its key was set: `FILE:LINE: ` for a key in the config file, `--set: ` for an
/// override (which wins over the file); lines whose key was not set anywhere (a default) are
/// left as they are.
fn locate_value_errors(msg: &str, text: &str, source: &Path, overrides: &[String]) -> String {
    let doc = toml::de::DeTable::parse(text).ok();
    let line_of_key = |key: &str| -> Option<usize> {
        let (sec, field) = key.split_once('.')?;
        let doc = doc.as_ref()?;
        let (_, sec_val) = doc.get_ref().iter().find(|(k, _)| {
            let name: &str = k.get_ref();
            name == sec
        })?;
        let (k, _) = sec_val.get_ref().as_table()?.iter().find(|(k, _)| {
            let name: &str = k.get_ref();
            name == field
        })?;
        Some(line_of(text, k.span().start))
    };
    msg.lines()
        .map(|l| {
            let key: String = l.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.').collect();
            let overridden = overrides.iter().any(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key));
            match line_of_key(&key) {
                _ if overridden => format!("--set: {l}"),
                Some(n) => format!("{}:{n}: {l}", source.display()),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1-based line of byte offset `pos`.
fn line_of(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The `key` of a `key = value` line (1-based), if the line has one, qualified by the
/// `[section]` header above it (`training.beta`), as `--set` and `--print-config` name keys.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let (k, _) = l.split_once('=')?;
    let k = k.trim().trim_matches('"');
    if k.is_empty() || k.starts_with('[') || k.starts_with('#') {
        return None;
    }
    let section = text.lines().take(line - 1).filter_map(|l| l.trim().strip_prefix('[')?.split(']').next()).last();
    Some(match section {
        Some(sec) if !k.contains('.') => format!("{}.{k}", sec.trim()),
        _ => k.to_string(),
    })
}

/// Every key of the document must be a known section / section key; the error names the line
/// of the offending key and the nearest valid one.
fn check_keys(text: &str, source: &Path) -> Result<()> {
    let doc = toml::de::DeTable::parse(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        Error::input(source, line, format!("invalid TOML: {}", e.message().trim()))
    })?;
    for (sec_key, sec_val) in doc.get_ref().iter() {
        let sec_name: &str = sec_key.get_ref();
        let line = line_of(text, sec_key.span().start);
        let Some(keys) = section_keys(sec_name) else {
            return Err(Error::input(source, Some(line), unknown_key_message(None, sec_name)));
        };
        let Some(fields) = sec_val.get_ref().as_table() else {
            return Err(Error::input(source, Some(line), format!("[{sec_name}] must be a table")));
        };
        for (k, _) in fields.iter() {
            let name: &str = k.get_ref();
            if !keys.contains(&name) {
                let line = line_of(text, k.span().start);
                return Err(Error::input(source, Some(line), unknown_key_message(Some(sec_name), name)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const GOOD: &str = r#"
[model]
path_or_id = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"

[data]
train_files = ["../shared/data/orca_dpo_pairs/validation.jsonl"]
train_rows = ":200"
eval_rows = "-84:"
max_length = 256

[training]
output_dir = "out"
beta = 0.1
"#;

    fn parse(text: &str) -> Result<RunConfig> {
        let cfg = RunConfig::from_toml_str(text, Path::new("run.toml"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let cfg = parse(GOOD).unwrap();
        assert_eq!(cfg.data.max_length, 256);
        assert_eq!(cfg.data.train_rows.unwrap().resolve(284), 0..200);
        assert_eq!(cfg.data.eval_rows.unwrap().resolve(284), 200..284);
        assert_eq!(cfg.training.loss_type, LossTypes::one(LossType::Sigmoid));
        assert_eq!(cfg.adapter, AdapterSection::default());
        assert_eq!(cfg.training.per_device_train_batch_size, 2);
    }

    // The key lists (used for suggestions, --set and --print-config) are exactly serde's fields:
    // serde's own unknown-field message lists the expected fields.
    #[test]
    fn key_lists_match_serde_fields() {
        for section in SECTIONS {
            let e = toml::from_str::<RunConfig>(&format!("[{section}]\nzzz_not_a_key = 1\n")).unwrap_err();
            let msg = e.message().to_string();
            let expected: Vec<&str> = msg.split('`').skip(3).step_by(2).collect();
            let mut want: Vec<&str> = section_keys(section).unwrap().to_vec();
            let mut got = expected.clone();
            want.sort();
            got.sort();
            assert_eq!(got, want, "[{section}]: serde says {msg}");
        }
    }

    #[test]
    fn unknown_key_suggests_nearest_and_names_line() {
        let text = GOOD.replace("beta = 0.1", "betta = 0.1");
        let e = err(&text);
        assert_eq!(e, "run.toml:13: unknown key training.betta; did you mean training.beta?");
        let e = err(&GOOD.replace("max_length = 256", "max_lenght = 256"));
        assert_eq!(e, "run.toml:9: unknown key data.max_lenght; did you mean data.max_length?");
        let e = err(&format!("{GOOD}\n[trainig]\nseed = 1\n"));
        assert!(e.starts_with("run.toml:15: unknown section [trainig]; did you mean [training]?"), "{e}");
        let e = err(&GOOD.replace("beta = 0.1", "completely_wrong = 1"));
        assert!(e.contains("unknown key training.completely_wrong; valid keys of [training]: output_dir,"), "{e}");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let e = err(&GOOD.replace("beta = 0.1", "beta = \"high\""));
        assert!(e.starts_with("run.toml:13: training.beta: "), "{e}");
        let e = err(&GOOD.replace("beta = 0.1", "loss_type = \"dpo\""));
        assert!(e.starts_with("run.toml:13:") && e.contains("sigmoid") && e.contains("dpo"), "{e}");
        let e = err(&GOOD.replace("train_rows = \":200\"", "train_rows = \"first 200\""));
        assert!(e.starts_with("run.toml:7:") && e.contains("invalid row slice"), "{e}");
        let e = err("[model\npath_or_id = 1");
        assert!(e.starts_with("run.toml:1: invalid TOML"), "{e}");
    }

    // `load` names where each bad value was set: the file's line, or --set.
    #[test]
    fn bad_values_name_file_line_or_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, GOOD.replace("beta = 0.1", "beta = 0.1\nlearning_rate = -1.0")).unwrap();
        let e = RunConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert_eq!(e, format!("{}:14: training.learning_rate must be > 0 (got -1)", path.display()));
        let e = RunConfig::load(Some(&path), &["training.beta=-2".into()]).unwrap_err().to_string();
        let want = format!("--set: training.beta must be > 0 (got -2)\n{}:14: training.learning_rate must be > 0 (got -1)", path.display());
        assert_eq!(e, want);
        // an override fixing the file's value: no error
        assert!(RunConfig::load(Some(&path), &["training.learning_rate=1e-4".into()]).is_ok());
        // a key set only by --set
        let e = RunConfig::load(Some(&path), &["training.learning_rate=1e-4".into(), "data.max_length=1".into()]).unwrap_err();
        assert_eq!(e.to_string(), "--set: data.max_length must be >= 2 (got 1)");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let cases: &[(&str, &str, &str)] = &[
            ("beta = 0.1", "beta = -0.1", "training.beta must be > 0 (got -0.1)"),
            ("beta = 0.1", "learning_rate = 0.0", "training.learning_rate must be > 0 (got 0)"),
            ("beta = 0.1", "label_smoothing = 0.1", "training.label_smoothing must be 0 for loss_type \"sigmoid\""),
            ("beta = 0.1", "loss_type = \"robust\"\nlabel_smoothing = 0.5", "training.label_smoothing must be in [0, 0.5) for loss_type \"robust\" (got 0.5)"),
            ("beta = 0.1", "loss_type = \"exo_pair\"", "training.label_smoothing must be in (0, 1) for loss_type \"exo_pair\""),
            ("beta = 0.1", "warmup_ratio = 1.5", "training.warmup_ratio must be in [0, 1) (got 1.5)"),
            ("beta = 0.1", "warmup_ratio = 0.1\nwarmup_steps = 3", "are exclusive"),
            ("beta = 0.1", "adam_beta2 = 1.0", "training.adam_beta2 must be in [0, 1) (got 1)"),
            ("beta = 0.1", "max_steps = 0", "training.max_steps must be -1 (use num_train_epochs) or > 0 (got 0)"),
            ("beta = 0.1", "per_device_train_batch_size = 0", "training.per_device_train_batch_size must be >= 1"),
            ("beta = 0.1", "gradient_accumulation_steps = 0", "training.gradient_accumulation_steps must be >= 1"),
            ("beta = 0.1", "rpo_alpha = -1.0", "training.rpo_alpha must be >= 0 (got -1)"),
            ("beta = 0.1", "num_train_epochs = 0.0", "training.num_train_epochs must be > 0 (got 0)"),
            ("max_length = 256", "max_length = 256\nmax_prompt_length = 256", "data.max_prompt_length must be in [1, data.max_length = 256) (got 256)"),
            ("max_length = 256", "max_length = 256\neval_split = 0.1", "data.eval_split and data.eval_rows are exclusive"),
            ("max_length = 256", "max_length = 256\neval_split = 1.0\neval_file = \"x\"", "data.eval_split must be in (0, 1) (got 1)"),
            ("train_files = [\"../shared/data/orca_dpo_pairs/validation.jsonl\"]", "train_files = []", "data.train_files must list at least one file"),
            ("path_or_id = \"/models/SmolLM2-135M-Instruct.Q4_1.gguf\"", "path_or_id = \"\"", "model.path_or_id must be set"),
        ];
        for (from, to, want) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "case {to:?} did not apply");
            let e = err(&text);
            assert!(e.contains(want), "for {to:?}: got {e:?}, want it to contain {want:?}");
        }
        // all problems at once
        let e = err(&GOOD.replace("beta = 0.1", "beta = 0.0\nlearning_rate = -1.0"));
        assert_eq!(e.lines().count(), 2, "{e}");
        let adapter = format!("{GOOD}\n[adapter]\nhouseholder_reflections = 3\n");
        assert!(err(&adapter).contains("adapter.householder_reflections must be even (paired identity init) (got 3)"));
        let nothing = format!("{GOOD}\n[adapter]\nhouseholder_reflections = 0\ngivens_stages = 0\nmagnitude = false\n");
        assert!(err(&nothing).contains("adapter has nothing to train"));
        // per-kind checks: LoRA's options only for type = "lora", RoPO's only for "ropo"
        for (extra, want) in [
            ("type = \"lora\"\nlora_r = 0", "adapter.lora_r must be > 0 (got 0)"),
            ("type = \"lora\"\nlora_alpha = -2", "adapter.lora_alpha must be > 0 (got -2)"),
            ("type = \"lora\"\nlora_dropout = 1.5", "adapter.lora_dropout must be in [0, 1) (got 1.5)"),
            ("type = \"lora\"\nlora_dropout = 0.05", "adapter.lora_dropout > 0 is not supported yet (got 0.05)"),
            ("type = \"full\"\ntarget_modules = [\"all-linear\", \"q_proj\"]", "\"all-linear\" must be the only entry"),
            ("type = \"lora\"\ntarget_modules = [\"(\"]", "adapter.target_modules[0] is not a valid regex"),
        ] {
            let e = err(&format!("{GOOD}\n[adapter]\n{extra}\n"));
            assert!(e.contains(want), "for {extra:?}: got {e:?}");
        }
        let lora = parse(&format!("{GOOD}\n[adapter]\ntype = \"lora\"\nhouseholder_reflections = 3\nlora_r = 16\nlora_alpha = 32\n")).unwrap();
        assert_eq!((lora.adapter.kind, lora.adapter.lora_r, lora.adapter.lora_alpha), (AdapterKind::Lora, 16, 32.0));
        let full = parse(&format!("{GOOD}\n[adapter]\ntype = \"full\"\ntarget_modules = [\"all-linear\"]\nlora_r = 0\n")).unwrap();
        assert_eq!(full.adapter.kind, AdapterKind::Full);
        let e = err(&format!("{GOOD}\n[adapter]\ntype = \"qlora\"\n"));
        assert!(e.contains("qlora") && e.contains("lora") && e.contains("full"), "{e}");
        let e = err(&format!("{GOOD}\n[adapter]\nlora_rank = 4\n"));
        assert!(e.contains("did you mean adapter.lora_r?"), "{e}");
    }

    #[test]
    fn overrides_apply_and_name_bad_keys() {
        let cfg = parse(GOOD).unwrap();
        let over = |s: &[&str]| cfg.with_overrides(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let c = over(&["training.beta=0.25", "training.loss_type=ipo", "adapter.target_modules=[\"q_proj\"]", "model.path_or_id=HuggingFaceTB/SmolLM2-135M-Instruct"]).unwrap();
        assert_eq!(c.training.beta, 0.25);
        assert_eq!(c.training.loss_type, LossTypes::one(LossType::Ipo));
        assert_eq!(c.adapter.target_modules, vec!["q_proj".to_string()]);
        assert_eq!(c.model.path_or_id, "HuggingFaceTB/SmolLM2-135M-Instruct");
        let c = over(&["model.reference=other.gguf", "data.eval_rows=-10:"]).unwrap();
        assert_eq!(c.model.reference.as_deref(), Some("other.gguf"));
        assert_eq!(c.data.eval_rows.unwrap().resolve(100), 90..100);
        let e = over(&["training.betta=0.2"]).unwrap_err().to_string();
        assert_eq!(e, "--set training.betta=0.2: unknown key training.betta; did you mean training.beta?");
        let e = over(&["trainin.beta=0.2"]).unwrap_err().to_string();
        assert!(e.contains("did you mean [training]?"), "{e}");
        let e = over(&["beta=0.2"]).unwrap_err().to_string();
        assert!(e.contains("expected section.key=value"), "{e}");
        let e = over(&["training.beta=high"]).unwrap_err().to_string();
        assert!(e.starts_with("--set training.beta=high:"), "{e}");
        // validation runs after overrides in load()
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, GOOD).unwrap();
        let e = RunConfig::load(Some(&p), &["training.beta=-0.1".into()]).unwrap_err().to_string();
        assert_eq!(e, "--set: training.beta must be > 0 (got -0.1)");
        let missing = PathBuf::from("/nonexistent/run.toml");
        let e = RunConfig::load(Some(&missing), &[]).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/run.toml: reading config"), "{e}");
    }

    // --print-config shows every key and parses back to the same config.
    #[test]
    fn print_config_round_trips_and_lists_every_key() {
        let mut cfg = parse(GOOD).unwrap();
        let s = cfg.to_toml_string();
        for section in SECTIONS {
            assert!(s.contains(&format!("[{section}]")));
            for key in section_keys(section).unwrap() {
                assert!(s.contains(&format!("\n{key} = ")) || s.contains(&format!("# {key} =")), "{key} missing:\n{s}");
            }
        }
        assert!(s.contains("# reference = (unset)"));
        assert!(s.contains("train_rows = \":200\""));
        assert_eq!(RunConfig::from_toml_str(&s, Path::new("printed.toml")).unwrap(), cfg);
        cfg.training.rpo_alpha = Some(1.0);
        cfg.model.reference = Some("ref.gguf".into());
        let s = cfg.to_toml_string();
        assert_eq!(RunConfig::from_toml_str(&s, Path::new("printed.toml")).unwrap(), cfg);
        // the defaults alone print too (model.path_or_id = "")
        let d = RunConfig::default().to_toml_string();
        assert_eq!(RunConfig::from_toml_str(&d, Path::new("d.toml")).unwrap(), RunConfig::default());
    }

    #[test]
    fn chat_template_source_inline_or_file() {
        let mut d = DataSection::default();
        assert_eq!(d.chat_template_source(), None);
        d.chat_template = Some("templates/chatml.jinja".into());
        assert_eq!(d.chat_template_source(), Some(TemplateSource::File("templates/chatml.jinja".into())));
        d.chat_template = Some("{% for m in messages %}{{ m.content }}{% endfor %}".into());
        assert!(matches!(d.chat_template_source(), Some(TemplateSource::Inline(_))));
    }

    #[test]
    fn row_slices_follow_python() {
        let s = |x: &str| RowSlice::try_from(x.to_string()).unwrap();
        assert_eq!(s(":").resolve(10), 0..10);
        assert_eq!(s("2:5").resolve(10), 2..5);
        assert_eq!(s("-3:").resolve(10), 7..10);
        assert_eq!(s(":-3").resolve(10), 0..7);
        assert_eq!(s("8:2").resolve(10), 8..8);
        assert_eq!(s(":200").resolve(50), 0..50);
        assert_eq!(s("-84:").resolve(50), 0..50);
        assert_eq!(String::from(s("-84:")), "-84:");
        assert!(RowSlice::try_from("200".to_string()).is_err());
        assert!(RowSlice::try_from("a:b".to_string()).is_err());
    }

    #[test]
    fn schedule_and_steps_from_config() {
        let mut t = TrainingSection::default();
        assert_eq!(t.total_steps(100), 100);
        t.num_train_epochs = 1.5;
        assert_eq!(t.total_steps(7), 11);
        t.max_steps = 6;
        assert_eq!(t.total_steps(100), 6);
        t.warmup_ratio = 0.1;
        assert_eq!(t.lr_schedule(100).warmup_steps, 10);
        t.warmup_ratio = 0.0;
        t.warmup_steps = 3;
        assert_eq!(t.lr_schedule(100).warmup_steps, 3);
        assert_eq!(t.loss_params().beta, 0.1);
        assert_eq!(t.adamw().beta2, 0.999);
    }

    #[test]
    fn edit_distance_and_nearest() {
        assert_eq!(strsim::levenshtein("beta", "betta"), 1);
        assert_eq!(strsim::levenshtein("", "abc"), 3);
        assert_eq!(strsim::levenshtein("kitten", "sitting"), 3);
        assert_eq!(nearest("lerning_rate", TRAINING_KEYS), Some("learning_rate"));
        assert_eq!(nearest("xyz", TRAINING_KEYS), None);
    }
}

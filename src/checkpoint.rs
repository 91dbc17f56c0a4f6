//! Checkpoints: everything needed to continue a run bit-identically, written atomically.
//!
//! Layout of `OUTPUT_DIR/checkpoints/step-N/`:
//! - `adapter_model.safetensors`: the trainable tensors, keyed by their full names;
//! - `optimizer.safetensors`: AdamW moments (`{name}.exp_avg`, `{name}.exp_avg_sq`), step in
//!   the header metadata;
//! - `checkpoint.json`: [`CheckpointMeta`]: global step, scheduler step, RNG state, data position;
//! - `config.toml`: the resolved run config;
//! - `trainer_state.json`: TRL/HF-like [`TrainerState`] (global_step, epoch, log_history).
//!
//! The folder is written as `step-N.tmp/` (every file fsynced) and then renamed to `step-N/`,
//! so a folder named `step-N` is complete; [`latest_complete`] ignores `.tmp` folders and
//! folders missing a file. Source of the habit: nanoGPT's checkpoint dict, made atomic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::optim::AdamW;

// The names of a run folder (`training.output_dir`) and of its checkpoint folders, in one place.

/// The resolved run config, at the top of the output folder and in every checkpoint.
pub const RUN_CONFIG_FILE: &str = "config.toml";
/// The metrics file at the top of the output folder (one JSON record a line).
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The training curves at the top of the output folder (written at the end of a run).
pub const CURVES_FILE: &str = "curves.png";
/// Folder (in the output folder) of the precomputed reference log-probs.
pub const REFERENCE_DIR: &str = "reference_logps";
/// Folder (in the output folder) of the checkpoints, `step-N/` each.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The adapter weights, in a checkpoint folder and (final) at the top of the output folder.
pub const ADAPTER_FILE: &str = crate::adapter::WEIGHTS_FILE;
/// AdamW state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// [`CheckpointMeta`].
pub const META_FILE: &str = "checkpoint.json";
/// [`TrainerState`].
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
const REQUIRED: [&str; 5] = [ADAPTER_FILE, OPTIMIZER_FILE, META_FILE, RUN_CONFIG_FILE, TRAINER_STATE_FILE];
/// Version of the checkpoint layout, checked on load.
pub const FORMAT_VERSION: u32 = 1;

/// The state of a ChaCha8 generator: seed, stream and word position (exact; restoring it
/// continues the same stream of numbers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// The position in the stream, in 32-bit words (a u128, as a decimal string: JSON numbers
    /// cannot hold it).
    pub word_pos: String,
}

impl RngState {
    /// Capture the state of `rng`.
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        let seed = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        Self { seed, stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
    }

    /// A generator in exactly this state. Errors: a malformed seed or position.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let bad = |what: &str| Error::Msg(format!("checkpoint RNG state: invalid {what}"));
        if self.seed.len() != 64 {
            return Err(bad("seed (expected 64 hex digits)"));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad("seed"))?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse::<u128>().map_err(|_| bad("word_pos"))?);
        Ok(rng)
    }
}

/// Where the data loader is: the next batch is batch `index_in_epoch` of epoch `epoch` (both
/// 0-based; the epoch's order is a pure function of the seed and the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataPosition {
    /// Current epoch.
    pub epoch: u64,
    /// Micro-batches of this epoch already consumed.
    pub index_in_epoch: u64,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Optimiser steps done.
    pub global_step: u64,
    /// The step the learning-rate schedule continues from (`lr_at(scheduler_step)` is the next rate).
    pub scheduler_step: u64,
    /// Total optimiser steps of the run.
    pub total_steps: u64,
    /// The training RNG.
    pub rng: RngState,
    /// The data loader's position.
    pub data: DataPosition,
    /// The ropo version that wrote it.
    pub ropo_version: String,
    /// The data-parallel ranks of the run that wrote it (1: one process; absent in older
    /// checkpoints). With its config's batch size and accumulation, the global batch.
    #[serde(default = "one_rank")]
    pub ranks: u64,
}

fn one_rank() -> u64 {
    1
}

/// TRL/HF-style `trainer_state.json` (keys sorted, as HF's `json.dumps(sort_keys=True)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub global_step: u64,
    /// Fractional epochs done.
    pub epoch: f64,
    /// Total optimiser steps of the run.
    pub max_steps: u64,
    /// As configured.
    pub num_train_epochs: f64,
    /// As configured.
    pub logging_steps: u64,
    /// As configured.
    pub eval_steps: u64,
    /// As configured.
    pub save_steps: u64,
    /// Pairs per micro-batch.
    pub train_batch_size: u64,
    /// Real (non-padding) tokens consumed so far.
    pub num_input_tokens_seen: u64,
    /// Every logged record, in order (the lines of `metrics.jsonl`).
    pub log_history: Vec<BTreeMap<String, serde_json::Value>>,
}

impl TrainerState {
    /// Pretty JSON (2-space indent, as HF).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Msg(format!("serialising trainer state: {e}")))
    }

    /// Write `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, self.to_json()?.as_bytes())?;
        Ok(())
    }

    /// Read a `trainer_state.json`; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::input(path, None, e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| Error::input(path, Some(e.line()), e.to_string()))
    }
}

/// What a checkpoint is made of, borrowed from the running trainer.
pub struct CheckpointData<'a> {
    /// The trainable tensors, in the optimiser's order.
    pub trainable: &'a [(String, Var)],
    /// The optimiser (moments and step).
    pub optimizer: &'a AdamW,
    /// Step, scheduler, RNG and data position.
    pub meta: CheckpointMeta,
    /// The resolved run config.
    pub config: &'a RunConfig,
    /// The trainer state so far.
    pub trainer_state: &'a TrainerState,
}

/// `OUTPUT_DIR/checkpoints`.
pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join(CHECKPOINTS_DIR)
}

/// `OUTPUT_DIR/checkpoints/step-N`.
pub fn step_dir(output_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(output_dir).join(format!("step-{step}"))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::Io(std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())));
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

fn sync_dir(dir: &Path) {
    // Best effort: makes the rename durable; not all filesystems allow opening a directory.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Write `checkpoints/step-N/` (N = `data.meta.global_step`) atomically; returns its path.
///
/// A failure (a full disk, an unwritable folder) removes the partial `step-N.tmp/` and leaves
/// the earlier checkpoints as they were. An existing `step-N/` is replaced.
pub fn save(output_dir: &Path, data: &CheckpointData) -> Result<PathBuf> {
    let step = data.meta.global_step;
    let root = checkpoints_dir(output_dir);
    std::fs::create_dir_all(&root)
        .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("creating {}: {e}", root.display()))))?;
    let final_dir = step_dir(output_dir, step);
    let tmp = root.join(format!("step-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let res = (|| -> Result<()> {
        std::fs::create_dir(&tmp)
            .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("creating {}: {e}", tmp.display()))))?;
        let tensors: Vec<(String, Tensor)> = data.trainable.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        write_synced(&tmp.join(ADAPTER_FILE), &crate::fsutil::safetensors_bytes(&tensors, None)?)?;
        write_synced(&tmp.join(OPTIMIZER_FILE), &data.optimizer.state_bytes()?)?;
        let meta = serde_json::to_string_pretty(&data.meta).map_err(|e| Error::Msg(e.to_string()))?;
        write_synced(&tmp.join(META_FILE), meta.as_bytes())?;
        write_synced(&tmp.join(RUN_CONFIG_FILE), data.config.to_toml_string().as_bytes())?;
        write_synced(&tmp.join(TRAINER_STATE_FILE), data.trainer_state.to_json()?.as_bytes())?;
        sync_dir(&tmp);
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)
            .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("renaming {} to {}: {e}", tmp.display(), final_dir.display()))))?;
        sync_dir(&root);
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(final_dir)
}

/// The complete checkpoints under `output_dir`, oldest first: `(step, folder)`. Folders named
/// `step-N.tmp` (interrupted writes) and folders missing a file are not complete.
pub fn complete_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = checkpoints_dir(output_dir);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io(std::io::Error::new(e.kind(), format!("reading {}: {e}", root.display())))),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else { continue };
        let path = entry.path();
        if path.is_dir() && REQUIRED.iter().all(|f| path.join(f).is_file()) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest_complete(output_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(complete_checkpoints(output_dir)?.pop())
}

/// Keep the newest `save_total_limit` complete checkpoints (0 keeps all) and remove leftover
/// `.tmp` folders; returns the removed folders.
pub fn prune(output_dir: &Path, save_total_limit: usize) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let root = checkpoints_dir(output_dir);
    if let Ok(entries) = std::fs::read_dir(&root) {
        let mut tmps: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("step-") && n.ends_with(".tmp")
            })
            .map(|e| e.path())
            .collect();
        tmps.sort();
        for t in tmps {
            std::fs::remove_dir_all(&t)?;
            removed.push(t);
        }
    }
    if save_total_limit > 0 {
        let all = complete_checkpoints(output_dir)?;
        let excess = all.len().saturating_sub(save_total_limit);
        for (_, path) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Files and folders a ropo run writes at the top of its output folder; an existing folder
/// holding any of them is "another run".
pub const RUN_ARTIFACTS: [&str; 7] = [
    CHECKPOINTS_DIR,
    METRICS_FILE,
    TRAINER_STATE_FILE,
    RUN_CONFIG_FILE,
    ADAPTER_FILE,
    crate::adapter::ADAPTER_CONFIG_FILE,
    REFERENCE_DIR,
];

/// Make `output_dir` ready for a fresh run (not a resume).
///
/// - missing or empty: created;
/// - holding a ropo run (any of [`RUN_ARTIFACTS`]): refused unless `overwrite`, in which case
///   those artefacts (and only they) are removed;
/// - holding other files only: refused, even with `overwrite` (ropo deletes nothing it did not
///   write).
///
/// Errors name the folder and what was found.
pub fn prepare_output_dir(output_dir: &Path, overwrite: bool) -> Result<()> {
    let io = |e: std::io::Error, what: &str| Error::Io(std::io::Error::new(e.kind(), format!("{what} {}: {e}", output_dir.display())));
    if output_dir.exists() && !output_dir.is_dir() {
        return Err(Error::input(output_dir, None, "output_dir exists and is not a folder"));
    }
    if !output_dir.exists() {
        return std::fs::create_dir_all(output_dir).map_err(|e| io(e, "creating"));
    }
    let mut entries: Vec<String> = std::fs::read_dir(output_dir)
        .map_err(|e| io(e, "reading"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    if entries.is_empty() {
        return Ok(());
    }
    let ours: Vec<&String> = entries.iter().filter(|n| RUN_ARTIFACTS.contains(&n.as_str())).collect();
    if ours.is_empty() {
        return Err(Error::input(
            output_dir,
            None,
            format!("output folder is not empty and holds no ropo run ({}); choose another training.output_dir", entries.join(", ")),
        ));
    }
    if !overwrite {
        let found: Vec<&str> = ours.iter().map(|s| s.as_str()).collect();
        return Err(Error::input(
            output_dir,
            None,
            format!("output folder holds another run ({}); pass --overwrite to replace it or --resume to continue it", found.join(", ")),
        ));
    }
    for name in ours {
        let p = output_dir.join(name);
        let res = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        res.map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("removing {}: {e}", p.display()))))?;
    }
    Ok(())
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// The folder it came from.
    pub dir: PathBuf,
    /// Step, scheduler, RNG and data position.
    pub meta: CheckpointMeta,
    /// The trainable tensors by name.
    pub trainable: BTreeMap<String, Tensor>,
    /// `optimizer.safetensors`, for [`AdamW::load_bytes`].
    pub optimizer_bytes: Vec<u8>,
    /// The resolved config it was written with (TOML text).
    pub config_toml: String,
    /// The trainer state.
    pub trainer_state: TrainerState,
}

/// Read a checkpoint folder; errors name the file.
pub fn load(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| Error::input(dir.join(name), None, e.to_string()));
    let meta_path = dir.join(META_FILE);
    let meta: CheckpointMeta = serde_json::from_slice(&read(META_FILE)?)
        .map_err(|e| Error::input(&meta_path, Some(e.line()), e.to_string()))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(Error::input(&meta_path, None, format!("checkpoint format {} (this ropo reads {FORMAT_VERSION})", meta.format_version)));
    }
    let adapter_path = dir.join(ADAPTER_FILE);
    let trainable = candle_core::safetensors::load_buffer(&read(ADAPTER_FILE)?, device)
        .map_err(|e| Error::input(&adapter_path, None, e.to_string()))?
        .into_iter()
        .collect();
    let config_toml = String::from_utf8(read(RUN_CONFIG_FILE)?).map_err(|e| Error::input(dir.join(RUN_CONFIG_FILE), None, e.to_string()))?;
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        meta,
        trainable,
        optimizer_bytes: read(OPTIMIZER_FILE)?,
        config_toml,
        trainer_state: TrainerState::load(&dir.join(TRAINER_STATE_FILE))?,
    })
}

impl LoadedCheckpoint {
    /// Set each trainable variable to its saved value. Every variable must be in the checkpoint
    /// with its shape and dtype, and the checkpoint must hold nothing else (errors name the tensor).
    pub fn restore_trainable(&self, params: &[(String, Var)]) -> Result<()> {
        if self.trainable.len() != params.len() {
            return Err(Error::input(
                self.dir.join(ADAPTER_FILE),
                None,
                format!("holds {} tensors, the model has {} trainable tensors", self.trainable.len(), params.len()),
            ));
        }
        for (name, var) in params {
            let t = self.trainable.get(name).ok_or_else(|| Error::MissingTensor(format!("{name} in {}", self.dir.join(ADAPTER_FILE).display())))?;
            if t.dims() != var.dims() || t.dtype() != var.dtype() {
                return Err(Error::Shape { name: name.clone(), expected: var.dims().to_vec(), got: t.dims().to_vec() });
            }
            var.set(t)?;
        }
        Ok(())
    }

    /// Restore the optimiser state (see [`AdamW::load_bytes`]).
    pub fn restore_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        opt.load_bytes(&self.optimizer_bytes).map_err(|e| Error::input(self.dir.join(OPTIMIZER_FILE), None, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamWConfig, Grads};
    use rand::{Rng, SeedableRng};

    fn setup() -> (Vec<(String, Var)>, AdamW) {
        let params = vec![
            ("model.layers.0.self_attn.q_proj.ropo_u".to_string(), Var::new(&[[0.5f32, -0.25], [1.0, 2.0]], &Device::Cpu).unwrap()),
            ("model.layers.0.self_attn.q_proj.ropo_magnitude".to_string(), Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()),
        ];
        let mut opt = AdamW::new(params.clone(), AdamWConfig::default()).unwrap();
        let loss = (params[0].1.as_tensor().sqr().unwrap().sum_all().unwrap() + params[1].1.as_tensor().sum_all().unwrap()).unwrap();
        let grads = Grads::from_store(&params, &loss.backward().unwrap()).unwrap();
        opt.step(&grads, 0.01).unwrap();
        (params, opt)
    }

    fn meta(step: u64, rng: &ChaCha8Rng) -> CheckpointMeta {
        CheckpointMeta {
            format_version: FORMAT_VERSION,
            global_step: step,
            scheduler_step: step,
            total_steps: 10,
            rng: RngState::capture(rng),
            data: DataPosition { epoch: 1, index_in_epoch: step },
            ropo_version: env!("CARGO_PKG_VERSION").into(),
            ranks: 1,
        }
    }

    fn state(step: u64) -> TrainerState {
        let mut rec = BTreeMap::new();
        rec.insert("loss".to_string(), serde_json::json!(std::f64::consts::LN_2));
        rec.insert("step".to_string(), serde_json::json!(step));
        TrainerState { global_step: step, epoch: 0.5, log_history: vec![rec], ..Default::default() }
    }

    #[test]
    fn rng_state_round_trip_continues_the_stream() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let _: Vec<u32> = (0..37).map(|_| rng.random()).collect();
        let saved = RngState::capture(&rng);
        let json = serde_json::to_string(&saved).unwrap();
        let mut restored = serde_json::from_str::<RngState>(&json).unwrap().restore().unwrap();
        let a: Vec<u64> = (0..100).map(|_| rng.random()).collect();
        let b: Vec<u64> = (0..100).map(|_| restored.random()).collect();
        assert_eq!(a, b);
        let bad = RngState { seed: "zz".into(), ..saved };
        assert!(bad.restore().is_err());
    }

    // Save, then load into fresh variables and a fresh optimiser: identical bytes and state.
    #[test]
    fn checkpoint_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (params, opt) = setup();
        let rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = RunConfig::default();
        let ts = state(3);
        let path = save(dir.path(), &CheckpointData { trainable: &params, optimizer: &opt, meta: meta(3, &rng), config: &cfg, trainer_state: &ts }).unwrap();
        assert_eq!(path, dir.path().join("checkpoints/step-3"));
        assert!(!dir.path().join("checkpoints/step-3.tmp").exists());

        let ck = load(&path, &Device::Cpu).unwrap();
        assert_eq!(ck.meta, meta(3, &rng));
        assert_eq!(ck.trainer_state, ts);
        assert_eq!(RunConfig::from_toml_str(&ck.config_toml, Path::new("c")).unwrap(), cfg);
        let fresh: Vec<(String, Var)> =
            params.iter().map(|(n, v)| (n.clone(), Var::zeros(v.dims(), v.dtype(), &Device::Cpu).unwrap())).collect();
        ck.restore_trainable(&fresh).unwrap();
        for ((_, a), (_, b)) in params.iter().zip(&fresh) {
            let bits = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b));
        }
        let mut opt2 = AdamW::new(fresh.clone(), AdamWConfig::default()).unwrap();
        ck.restore_optimizer(&mut opt2).unwrap();
        assert_eq!(opt2.step_count(), 1);
        assert_eq!(opt2.state_bytes().unwrap(), opt.state_bytes().unwrap());
        let mut r = ck.meta.rng.restore().unwrap();
        let mut r0 = rng.clone();
        assert_eq!(r.random::<u64>(), r0.random::<u64>());
    }

    #[test]
    fn restore_rejects_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (params, opt) = setup();
        let rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = RunConfig::default();
        let ts = state(1);
        let path = save(dir.path(), &CheckpointData { trainable: &params, optimizer: &opt, meta: meta(1, &rng), config: &cfg, trainer_state: &ts }).unwrap();
        let ck = load(&path, &Device::Cpu).unwrap();
        let wrong_shape = vec![
            (params[0].0.clone(), Var::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap()),
            (params[1].0.clone(), Var::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap()),
        ];
        let e = ck.restore_trainable(&wrong_shape).unwrap_err().to_string();
        assert!(e.contains("q_proj.ropo_u") && e.contains("[2, 3]"), "{e}");
        let wrong_name = vec![
            ("x".to_string(), Var::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap()),
            (params[1].0.clone(), Var::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap()),
        ];
        let e = ck.restore_trainable(&wrong_name).unwrap_err().to_string();
        assert!(e.starts_with("missing tensor x in"), "{e}");
        let e = ck.restore_trainable(&params[..1]).unwrap_err().to_string();
        assert!(e.contains("holds 2 tensors, the model has 1"), "{e}");
        // a corrupt meta file names itself
        std::fs::write(path.join(META_FILE), "{ not json").unwrap();
        let e = load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("checkpoint.json:1"), "{e}");
    }

    // latest_complete ignores .tmp folders and incomplete ones; prune keeps the newest N.
    #[test]
    fn latest_complete_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        assert_eq!(latest_complete(out).unwrap(), None);
        let (params, opt) = setup();
        let rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = RunConfig::default();
        for step in [2u64, 4, 6, 8] {
            let ts = state(step);
            save(out, &CheckpointData { trainable: &params, optimizer: &opt, meta: meta(step, &rng), config: &cfg, trainer_state: &ts }).unwrap();
        }
        // an interrupted write of step 10 and a folder missing its optimiser state
        std::fs::create_dir_all(out.join("checkpoints/step-10.tmp")).unwrap();
        std::fs::write(out.join("checkpoints/step-10.tmp/adapter_model.safetensors"), b"partial").unwrap();
        std::fs::create_dir_all(out.join("checkpoints/step-12")).unwrap();
        std::fs::write(out.join("checkpoints/step-12/checkpoint.json"), b"{}").unwrap();
        std::fs::create_dir_all(out.join("checkpoints/notes")).unwrap();
        assert_eq!(latest_complete(out).unwrap(), Some((8, out.join("checkpoints/step-8"))));
        let removed = prune(out, 2).unwrap();
        assert_eq!(removed, vec![out.join("checkpoints/step-10.tmp"), out.join("checkpoints/step-2"), out.join("checkpoints/step-4")]);
        let steps: Vec<u64> = complete_checkpoints(out).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![6, 8]);
        assert!(prune(out, 0).unwrap().is_empty());
    }

    // An unwritable output folder: a clear error, no step-N and no step-N.tmp left behind.
    #[test]
    fn unwritable_folder_leaves_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::create_dir_all(out.join("checkpoints")).unwrap();
        std::fs::set_permissions(out.join("checkpoints"), std::fs::Permissions::from_mode(0o555)).unwrap();
        // root ignores permissions; then the check below is about a file in the way instead.
        let probe = std::fs::File::create(out.join("checkpoints/probe"));
        let is_root = probe.is_ok();
        let (params, opt) = setup();
        let rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = RunConfig::default();
        let ts = state(5);
        if is_root {
            std::fs::remove_file(out.join("checkpoints/probe")).unwrap();
            std::fs::set_permissions(out.join("checkpoints"), std::fs::Permissions::from_mode(0o755)).unwrap();
            // make writing the step folder fail: a file where a folder is needed
            std::fs::remove_dir_all(out.join("checkpoints")).unwrap();
            std::fs::write(out.join("checkpoints"), b"not a folder").unwrap();
        }
        let e = save(out, &CheckpointData { trainable: &params, optimizer: &opt, meta: meta(5, &rng), config: &cfg, trainer_state: &ts })
            .unwrap_err()
            .to_string();
        assert!(e.contains("checkpoints"), "{e}");
        if !is_root {
            std::fs::set_permissions(out.join("checkpoints"), std::fs::Permissions::from_mode(0o755)).unwrap();
            let left: Vec<_> = std::fs::read_dir(out.join("checkpoints")).unwrap().collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
        assert_eq!(latest_complete(out).ok().flatten(), None);
    }

    #[test]
    fn output_dir_refuses_another_run_without_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        prepare_output_dir(&out, false).unwrap();
        assert!(out.is_dir());
        prepare_output_dir(&out, false).unwrap(); // empty: fine
        std::fs::write(out.join("metrics.jsonl"), b"{}\n").unwrap();
        std::fs::create_dir_all(out.join("checkpoints/step-2")).unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = prepare_output_dir(&out, false).unwrap_err().to_string();
        assert!(e.contains("holds another run (checkpoints, metrics.jsonl)") && e.contains("--overwrite"), "{e}");
        prepare_output_dir(&out, true).unwrap();
        let left: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, vec!["notes.txt".to_string()], "only ropo's artefacts are removed");
        let e = prepare_output_dir(&out, true).unwrap_err().to_string();
        assert!(e.contains("holds no ropo run (notes.txt)"), "{e}");
        let file = dir.path().join("afile");
        std::fs::write(&file, b"x").unwrap();
        assert!(prepare_output_dir(&file, true).unwrap_err().to_string().contains("not a folder"));
    }

    // Saving a step that already exists replaces it (resume re-saving the same step).
    #[test]
    fn resave_same_step_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (params, opt) = setup();
        let rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = RunConfig::default();
        let ts = state(2);
        let data = CheckpointData { trainable: &params, optimizer: &opt, meta: meta(2, &rng), config: &cfg, trainer_state: &ts };
        save(dir.path(), &data).unwrap();
        std::fs::write(dir.path().join("checkpoints/step-2/stale"), b"x").unwrap();
        save(dir.path(), &data).unwrap();
        assert!(!dir.path().join("checkpoints/step-2/stale").exists());
        assert_eq!(latest_complete(dir.path()).unwrap().unwrap().0, 2);
    }
}

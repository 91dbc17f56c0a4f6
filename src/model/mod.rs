//! The Llama-family model runtime and its loaders.
//!
//! [`load`] takes an HF model folder, a `.gguf` file or a hub repo id and returns the project's
//! model with its tokenizer; [`load_parts`] stops before building the model (config, tensors by
//! HF name, tokenizer).

pub mod attention;
pub mod bf16_gemm;
pub mod config;
pub mod export;
pub mod fingerprint;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_vocab;
pub mod grad;
pub mod heads;
pub mod hf_config;
pub mod hf_folder;
pub mod hub;
pub mod linear;
pub mod llama;
pub mod ops;
pub mod prefix;
pub mod proj;
pub mod reduce;
pub(crate) mod slice_gemm;
pub mod swiglu_down;
pub mod tokenizer;
pub mod vexp;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use config::ModelConfig;
use tokenizer::Tokenizer;

/// What every loader produces before the model is built.
#[derive(Debug)]
pub struct ModelParts {
    /// The resolved configuration.
    pub config: ModelConfig,
    /// Weights by HF name (`model.layers.0.self_attn.q_proj.weight`, `(out, in)` layout), in
    /// their stored dtype (f32 for GGUF). No `lm_head.weight` when embeddings are tied.
    pub tensors: BTreeMap<String, Tensor>,
    /// The tokenizer bundle (chat template, BOS/EOS).
    pub tokenizer: Tokenizer,
}

impl ModelParts {
    /// A `VarBuilder` over the tensors, converting to `dtype` on `device` as they are fetched.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let map: HashMap<String, Tensor> = self.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        VarBuilder::from_tensors(map, dtype, device)
    }
}

/// How to load: hub revision, compute dtype, device.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Hub revision (branch, tag or commit); `None` = `main`. Ignored for local paths.
    pub revision: Option<String>,
    /// The dtype of the model's weights: F32 (training and parity), BF16 (projection weights
    /// in bf16 with f32 accumulation, everything else f32: [`llama::Model::narrow_projections_to_bf16`])
    /// or F64 (finite-difference checks).
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { revision: None, dtype: DType::F32, device: Device::Cpu }
    }
}

/// Where a model comes from, decided from the `source` string by [`Source::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An existing directory: an HF model folder.
    HfFolder(PathBuf),
    /// An existing `.gguf` file.
    Gguf(PathBuf),
    /// A hub repo id (`org/name`).
    Hub(String),
}

impl Source {
    /// An existing directory -> HF folder; an existing `*.gguf` file -> GGUF; a string shaped
    /// like `org/name` that is not a path on disk -> hub id.
    ///
    /// Errors: a path that does not exist (anything not shaped like a repo id, e.g. `./m`,
    /// `/x/y`, `m.gguf`), an existing file that is not `.gguf`.
    pub fn parse(source: &str) -> Result<Source> {
        let p = Path::new(source);
        if p.is_dir() {
            return Ok(Source::HfFolder(p.to_path_buf()));
        }
        if p.is_file() {
            if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Ok(Source::Gguf(p.to_path_buf()));
            }
            return Err(Error::input(p, None, "is a file but not a .gguf file (expected an HF model folder, a .gguf file or a hub repo id)"));
        }
        if hub::looks_like_repo_id(source) {
            return Ok(Source::Hub(source.to_string()));
        }
        Err(Error::input(p, None, "no such file or directory (expected an HF model folder, a .gguf file or a hub repo id)"))
    }
}

/// Load config, tensors and tokenizer from `source` (see [`Source::parse`]); tensors are put on
/// `opts.device` (dtype conversion happens when the model is built).
///
/// Errors: see [`Source::parse`], [`gguf::load`], [`hf_folder::load`], [`hub::snapshot`].
pub fn load_parts(source: &str, opts: &LoadOptions) -> Result<ModelParts> {
    match Source::parse(source)? {
        Source::HfFolder(dir) => hf_folder::load(&dir, &opts.device),
        Source::Gguf(path) => gguf::load(&path, &opts.device),
        Source::Hub(id) => {
            let dir = hub::snapshot(&id, opts.revision.as_deref())?;
            hf_folder::load(&dir, &opts.device)
        }
    }
}

/// A model ready to run: the project's Llama-family model, its tokenizer and configuration.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model, in `LoadOptions::dtype` on `LoadOptions::device`.
    pub model: llama::Model,
    /// The tokenizer bundle (chat template, BOS/EOS, generation-ending ids).
    pub tokenizer: Tokenizer,
    /// The resolved configuration.
    pub config: ModelConfig,
    /// The `source` string it was loaded from (path or hub id).
    pub source: String,
}

/// Load the model and tokenizer from an HF model folder, a `.gguf` file or a hub repo id
/// (see [`Source::parse`]), in `opts.dtype` on `opts.device`.
///
/// Errors: everything [`load_parts`] reports, plus a missing or mis-shaped tensor (named).
pub fn load(source: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    if !matches!(opts.dtype, DType::F32 | DType::F64 | DType::BF16) {
        return Err(Error::Config(format!("{source}: model dtype {:?} is not supported (f32, bf16, or f64 for checks)", opts.dtype)));
    }
    let parts = load_parts(source, opts)?;
    // bf16: the model is built in f32 and only the projection weights are narrowed (bf16
    // products with f32 accumulation; activations, norms, attention and adapters stay f32).
    let build = if opts.dtype == DType::BF16 { DType::F32 } else { opts.dtype };
    let vb = parts.var_builder(build, &opts.device);
    let mut model = llama::Model::load(vb, &parts.config).map_err(|e| Error::Msg(format!("{source}: {e}")))?;
    drop(parts.tensors);
    if opts.dtype == DType::BF16 {
        model.narrow_projections_to_bf16().map_err(|e| Error::Msg(format!("{source}: {e}")))?;
    }
    Ok(LoadedModel { model, tokenizer: parts.tokenizer, config: parts.config, source: source.to_string() })
}

impl LoadedModel {
    /// Write this model (base weights, adapters not merged) as an HF folder; see
    /// [`export::write_hf_folder`].
    pub fn export(&self, dir: &Path, dtype: DType) -> Result<()> {
        let tensors: BTreeMap<String, Tensor> = self.model.tensors().into_iter().collect();
        export::write_hf_folder(dir, &self.config, &tensors, &self.tokenizer, dtype)
    }

    /// Write the model as the GGUF file `path` (llama.cpp's layout, weights in `dtype`,
    /// `general.name` = `name`; atomic): [`gguf_export::write_gguf`].
    ///
    /// Errors: a Qwen3 or Phi-3 model (no GGUF export of their q/k norms or fused projections
    /// yet; write an HF folder), and
    /// everything [`gguf_export::write_gguf`] reports.
    pub fn export_gguf(&self, path: &Path, dtype: gguf_export::GgufDtype, name: &str) -> Result<()> {
        if matches!(self.config.arch, config::Arch::Qwen3 | config::Arch::Phi3) {
            let arch = hf_config::model_type(self.config.arch);
            return Err(Error::Config(format!("{}: GGUF export of {arch} models is not supported (export an HF folder with `ropo merge --out DIR`)", path.display())));
        }
        let tensors: BTreeMap<String, Tensor> = self.model.tensors().into_iter().collect();
        gguf_export::write_gguf(path, &self.config, &tensors, &self.tokenizer, dtype, name)
    }
}

//! `ropo merge`: bake an adapter (RoPO, LoRA or full) into the weights and write a standard HF model folder.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;

/// Arguments of `ropo merge`.
///
/// Loads the base model (HF folder, .gguf file or hub id), loads the adapter onto it, computes
/// `W' = diag(m / rho) W R^T` for every adapted layer and writes config.json, model.safetensors,
/// tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json.
/// A GGUF base is written in the HF layout (Q/K un-permuted).
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The base model.
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output folder. Must not exist or be empty, unless --force.
    #[arg(long)]
    pub out: PathBuf,
    /// The dtype of the written weights (computed in f32/f64 either way).
    #[arg(long, value_enum, default_value_t = ExportDtype::F32)]
    pub dtype: ExportDtype,
    /// Replace a non-empty output folder holding a model (config.json; never an adapter or a
    /// training run), only once the new one is fully written.
    #[arg(long)]
    pub force: bool,
}

/// Weight dtypes of the merged folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    /// 32-bit float (4 bytes a parameter).
    F32,
    /// bfloat16 (2 bytes a parameter; f32's range, 8 bits of mantissa).
    Bf16,
    /// IEEE half precision (2 bytes a parameter; range up to 65504).
    F16,
}

impl From<ExportDtype> for DType {
    fn from(d: ExportDtype) -> DType {
        match d {
            ExportDtype::F32 => DType::F32,
            ExportDtype::Bf16 => DType::BF16,
            ExportDtype::F16 => DType::F16,
        }
    }
}

/// Run `ropo merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let n = ropo_merge(&args).with_context(|| format!("merging {} into {}", args.adapter.display(), args.model.path_or_id))?;
    eprintln!("merged {n} adapted layers; wrote {}", args.out.display());
    Ok(())
}

fn ropo_merge(args: &MergeArgs) -> crate::error::Result<usize> {
    let load_opts = args.model.load_options(DType::F32);
    crate::adapter::merge::merge_to_folder(&args.model.path_or_id, &load_opts, &args.adapter, &args.out, args.dtype.into(), args.force)
}

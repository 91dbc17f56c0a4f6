//! `ropo merge`: bake an adapter (RoPO, LoRA or full) into the weights and write a standard HF
//! model folder, or one GGUF file (`--out FILE.gguf`) for llama.cpp.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;

use crate::model::gguf_export::GgufDtype;

/// Arguments of `ropo merge`.
///
/// Loads the base model (HF folder, .gguf file or hub id), loads the adapter onto it, computes
/// `W' = diag(m / rho) W R^T` for every adapted layer and writes config.json, model.safetensors,
/// tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json.
/// A GGUF base is written in the HF layout (Q/K un-permuted). With `--out FILE.gguf`, one GGUF
/// file in llama.cpp's layout instead (tensor names, metadata, tokenizer and chat template;
/// `--dtype f32`, `f16` or `q8_0`).
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The base model.
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output folder (must not exist or be empty, unless --force), or a `.gguf` file (must
    /// not exist, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// The dtype of the written weights (computed in f32/f64 either way): f32, bf16 or f16 for a
    /// folder; f32, f16 or q8_0 for a GGUF file (norms and biases stay f32).
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
    /// llama.cpp's Q8_0 (GGUF only: 8-bit weights in blocks of 32 with an f16 scale, 8.5 bits a
    /// parameter).
    #[value(name = "q8_0")]
    Q8_0,
}

impl ExportDtype {
    /// The GGUF weight type; bf16 is not offered for GGUF.
    fn gguf(self) -> crate::error::Result<GgufDtype> {
        match self {
            ExportDtype::F32 => Ok(GgufDtype::F32),
            ExportDtype::F16 => Ok(GgufDtype::F16),
            ExportDtype::Q8_0 => Ok(GgufDtype::Q8_0),
            ExportDtype::Bf16 => Err(crate::error::Error::Config("--dtype bf16 is for HF folders; a GGUF output takes f32, f16 or q8_0".into())),
        }
    }

    /// The safetensors dtype of an HF folder; q8_0 is GGUF only.
    fn folder(self) -> crate::error::Result<DType> {
        match self {
            ExportDtype::F32 => Ok(DType::F32),
            ExportDtype::Bf16 => Ok(DType::BF16),
            ExportDtype::F16 => Ok(DType::F16),
            ExportDtype::Q8_0 => Err(crate::error::Error::Config("--dtype q8_0 is for GGUF files (--out FILE.gguf); a folder takes f32, bf16 or f16".into())),
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
    let load_opts = args.model.load_options(DType::F32)?;
    let (source, adapter) = (&args.model.path_or_id, &args.adapter);
    if args.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        crate::adapter::merge::merge_to_gguf(source, &load_opts, adapter, &args.out, args.dtype.gguf()?, args.force)
    } else {
        crate::adapter::merge::merge_to_folder(source, &load_opts, adapter, &args.out, args.dtype.folder()?, args.force)
    }
}

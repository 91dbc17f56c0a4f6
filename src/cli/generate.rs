//! `ropo generate`: load a model (HF folder, `.gguf` file or hub id), optionally render the chat
//! template, and print the completion.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;

use crate::adapter::AnyAdapterSet;
use crate::data::template::{ChatTemplate, Message};
use crate::generate::{generate, GenerateOptions};
use crate::model::load;

/// Arguments of `ropo generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// A trained adapter folder to apply (RoPO, PEFT LoRA or full; read from its adapter_config.json).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Render the prompt with the model's chat template (a user turn, add_generation_prompt).
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, value_name = "TEXT", requires = "chat")]
    pub system: Option<String>,
    /// The prompt; read from standard input when absent.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// At most this many new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 = off.
    ///
    /// Only used when --temperature > 0.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampler's RNG (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute dtype: f32, or bf16 (projection weights in bf16, products with f32
    /// accumulation, the rest f32; faster, greedy text may differ from f32 after a few tokens).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
}

/// Run `ropo generate`: prints the completion (special tokens skipped) on standard output.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.adapter {
        // check the adapter folder before the (slow) model load
        crate::adapter::any::stored_kind(dir).with_context(|| format!("--adapter {}", dir.display()))?;
    }
    let opts = GenerateOptions { max_new_tokens: args.max_new_tokens, temperature: args.temperature, top_p: args.top_p, seed: args.seed };
    // check the sampling options before the (slow) load
    crate::generate::Sampler::new(&opts)?;
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the prompt from standard input")?;
            s
        }
    };
    let dtype = if args.dtype == "bf16" { candle_core::DType::BF16 } else { candle_core::DType::F32 };
    let mut lm = load(&args.model.path_or_id, &args.model.load_options(dtype)?).with_context(|| format!("loading model {}", args.model.path_or_id))?;
    if let Some(dir) = &args.adapter {
        let set = AnyAdapterSet::load(dir, &mut lm.model).with_context(|| format!("loading adapter {} onto {}", dir.display(), args.model.path_or_id))?;
        tracing::info!("adapter {} ({}): {}", dir.display(), set.kind().as_str(), set.report());
    }
    let tok = &lm.tokenizer;
    let (text, add_special) = if args.chat {
        let src = tok.chat_template.as_deref().with_context(|| format!("--chat: model {} has no chat template", args.model.path_or_id))?;
        let tmpl = ChatTemplate::new(src, tok.bos_token.as_deref(), tok.eos_token.as_deref()).context("compiling the chat template")?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", prompt));
        // the template writes the special tokens itself
        (tmpl.render(&messages, true).context("rendering the chat template")?, false)
    } else {
        (prompt, true)
    };
    let ids = tok.inner.encode(text, add_special).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?.get_ids().to_vec();
    let out = generate(&lm.model, tok, &ids, &opts, args.adapter.is_some())?;
    println!("{}", out.text);
    Ok(())
}

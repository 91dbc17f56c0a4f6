//! `ropo data ...`.

use std::path::PathBuf;

use anyhow::Context;

use crate::data::inspect::inspect;
use crate::data::tokenize::TokenizeOptions;
use crate::data::{Format, LoadOptions, OnIdentical};

/// Data subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Show format, row counts, drops and token-length percentiles of a preference file.
    Inspect(InspectArgs),
}

/// Arguments of `ropo data inspect`.
///
/// Loads FILE as training would (format detection, row checks, the model's chat template and
/// tokenizer, truncation), then prints the format, the rows read and dropped (with the reason
/// and the first line numbers), token-length percentiles of prompt, chosen and rejected, and
/// one example with the prompt/completion boundary marked.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The preference data: a .jsonl, .json (an array, both optionally gzip'd) or .parquet file, a
    /// glob of them (`data/*.parquet`, quoted), or a Hub dataset `hf://datasets/ORG/NAME[@REV]`.
    pub file: String,
    /// The split of a Hub dataset (its `data/<split>-*` files, or `<split>/` folder, ...).
    #[arg(long, value_name = "NAME", default_value = "train")]
    pub split: String,
    /// The model whose tokenizer and chat template are used.
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Maximum tokens of prompt + completion.
    ///
    /// Longer sequences keep their start (the completion is cut); a row whose prompt alone has
    /// this many tokens is dropped and counted. Default: no limit.
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// Drop (and count) rows whose prompt has more tokens than this. Default: no limit.
    #[arg(long, value_name = "N")]
    pub max_prompt_length: Option<usize>,
    /// Read the rows as this format instead of detecting it.
    ///
    /// One of standard, implicit_prompt, conversational, openai, hh, sharegpt, alpaca,
    /// chat_template, axolotl_argilla, axolotl_icr, axolotl_intel, axolotl_prompt_pairs,
    /// axolotl_ultra, axolotl_nectar.
    #[arg(long, value_name = "F")]
    pub format: Option<Format>,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Fail on a row whose chosen equals its rejected, instead of skipping and counting it.
    #[arg(long)]
    pub fail_on_identical: bool,
}

/// Run a data subcommand.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Inspect(args) => run_inspect(args),
    }
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let template = args
        .chat_template
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading the chat template {}", p.display())))
        .transpose()?;
    let tokenizer = crate::model::load_parts(&args.model.path_or_id, &args.model.load_options(candle_core::DType::F32)?)
        .with_context(|| format!("loading the tokenizer of {}", args.model.path_or_id))?
        .tokenizer;
    let load_opts = LoadOptions {
        format: args.format,
        on_identical: if args.fail_on_identical { OnIdentical::Error } else { OnIdentical::Skip },
    };
    let options = TokenizeOptions { max_length: args.max_length, max_prompt_length: args.max_prompt_length };
    let report = inspect(&args.file, &args.split, &tokenizer, template.as_deref(), &load_opts, options)?;
    print!("{report}");
    Ok(())
}

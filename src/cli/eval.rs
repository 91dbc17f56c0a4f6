//! `ropo eval`: reward-hacking diagnostics of a model, optionally with an adapter and side by
//! side with the base model: preference metrics, generation statistics, MMLU, energy.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::data::tokenize::{PairTokenizer, TokenizeOptions};
use crate::eval::generation::{counted_ids, generate_all, generation_stats, load_prompts};
use crate::eval::mmlu::{self, ModelScorer, Split};
use crate::eval::preference::{preference_metrics, DEFAULT_TOLERANCE};
use crate::eval::report::{EvalReport, ModelReport};
use crate::generate::{GenerateOptions, Generation};
use crate::logps::{score_pairs, Pass};
use crate::loss::PairLogps;
use crate::model::llama::Model;
use crate::model::tokenizer::Tokenizer;
use crate::model::load;

/// Arguments of `ropo eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// A trained adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Also measure the base model (adapter bypassed) and print base | adapted | delta.
    #[arg(long, requires = "adapter")]
    pub compare_base: bool,
    /// Compute dtype of the model: f32; bf16 (projection weights in bf16, products with f32
    /// accumulation, the rest f32: faster, log-probs within ~1e-2 relative of f32, as
    /// `model.dtype = "bf16"` trains); or f64 (slower; float noise ~1e-12 instead of ~1e-6,
    /// e.g. to check that an identity adapter changes nothing).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f64"])]
    pub dtype: String,
    /// Write the whole report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Preference pairs (any format `ropo data inspect` reads; a file, a glob such as
    /// `data/*.parquet`, or `hf://datasets/ORG/NAME`): rewards/accuracies, rewards/margins,
    /// logps/chosen, logps/rejected and the DPO loss, against the base model.
    #[arg(long, value_name = "FILE", help_heading = "Preference metrics")]
    pub prefs: Option<PathBuf>,
    /// The split of a Hub dataset given to --prefs or --prompts (TRL's `dataset_test_split`).
    #[arg(long, value_name = "NAME", default_value = "test")]
    pub split: String,
    /// β of the implicit reward.
    #[arg(long, default_value_t = 0.1, help_heading = "Preference metrics")]
    pub beta: f64,
    /// Maximum prompt + completion length in tokens (longer pairs keep their start).
    #[arg(long, default_value_t = 512, help_heading = "Preference metrics")]
    pub max_length: usize,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 2, help_heading = "Preference metrics")]
    pub batch_size: usize,
    /// Use only the first N pairs.
    #[arg(long, value_name = "N", help_heading = "Preference metrics")]
    pub limit: Option<usize>,
    /// A chat template (Jinja source file) replacing the model's.
    #[arg(long, value_name = "FILE", help_heading = "Preference metrics")]
    pub chat_template: Option<PathBuf>,

    /// Prompts to generate from: a prompts file (`{"prompt": "..."}` or `{"messages": [...]}` a
    /// line) or a preference file (its prompts are used).
    ///
    /// Each prompt is generated greedily and with seeded sampling; the generations are written to
    /// --generations.
    #[arg(long, value_name = "FILE", help_heading = "Generations")]
    pub prompts: Option<PathBuf>,
    /// How many prompts to use (the first K of the file).
    #[arg(long, value_name = "K", default_value_t = 16, help_heading = "Generations")]
    pub samples: usize,
    /// Generation budget per prompt.
    #[arg(long, default_value_t = 128, help_heading = "Generations")]
    pub max_new_tokens: usize,
    /// Temperature of the sampled generations (greedy ones use 0).
    #[arg(long, default_value_t = 0.7, help_heading = "Generations")]
    pub temperature: f64,
    /// Nucleus mass of the sampled generations, in (0, 1].
    #[arg(long, default_value_t = 0.9, help_heading = "Generations")]
    pub top_p: f64,
    /// Seed of the sampled generations (prompt i uses seed + i).
    #[arg(long, default_value_t = 0, help_heading = "Generations")]
    pub seed: u64,
    /// Where to write the generations [default: generations.jsonl beside --out, else in the
    /// current folder].
    #[arg(long, value_name = "FILE", help_heading = "Generations")]
    pub generations: Option<PathBuf>,
    /// Drift from the reference on the --prompts: the base model generates greedily, then each
    /// model's per-token KL(reference || model) and negative log-likelihood over those
    /// completions (drift/kl, drift/nll; 0 and the base NLL for the base model).
    #[arg(long, requires = "prompts", help_heading = "Generations")]
    pub drift: bool,

    /// MMLU data folder (holding dev/ and test/, or data/dev and data/test).
    #[arg(long, value_name = "DIR", requires = "subjects", help_heading = "Knowledge retention (MMLU)")]
    pub mmlu: Option<PathBuf>,
    /// Comma-separated MMLU subjects, e.g. astronomy,marketing.
    #[arg(long, value_name = "A,B,C", value_delimiter = ',', requires = "mmlu", help_heading = "Knowledge retention (MMLU)")]
    pub subjects: Vec<String>,
    /// Dev examples per prompt (0 = zero-shot; 5 as the original evaluation).
    #[arg(long, default_value_t = 5, help_heading = "Knowledge retention (MMLU)")]
    pub shots: usize,
    /// letter: the choices listed A-D, the answer letter's log-prob (hendrycks/test); cloze:
    /// each choice's text scored by its log-likelihood after the question, plus accuracy per
    /// character (lighteval's mmlu_cloze, how small models are evaluated).
    #[arg(long, value_enum, default_value = "letter", help_heading = "Knowledge retention (MMLU)")]
    pub mmlu_format: mmlu::MmluFormat,
    /// Score only the first N test questions of each subject.
    #[arg(long, value_name = "N", help_heading = "Knowledge retention (MMLU)")]
    pub mmlu_limit: Option<usize>,
    /// Longest MMLU prompt in tokens; longer ones drop dev examples.
    #[arg(long, default_value_t = 2048, help_heading = "Knowledge retention (MMLU)")]
    pub mmlu_max_tokens: usize,

    /// Hyperspherical energy of every adapted layer, base vs adapted weights (needs --adapter).
    #[arg(long, requires = "adapter")]
    pub energy: bool,
}

/// A progress bar over `len` items (drawn only on a terminal).
fn bar(len: usize, what: &str) -> ProgressBar {
    let visible = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("CI").is_none();
    let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let b = ProgressBar::with_draw_target(Some(len as u64), target);
    b.set_style(
        ProgressStyle::with_template("{msg} {pos}/{len} [{bar:30}] [{elapsed_precise}<{eta_precise}]")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// The models measured: `(name, use_adapters)`, base first.
fn columns(args: &EvalArgs) -> Vec<(&'static str, bool)> {
    match (&args.adapter, args.compare_base) {
        (None, _) => vec![("base", false)],
        (Some(_), false) => vec![("adapted", true)],
        (Some(_), true) => vec![("base", false), ("adapted", true)],
    }
}

/// Check the arguments that can be checked before loading the model (fail fast).
fn check_inputs(args: &EvalArgs) -> anyhow::Result<()> {
    for (flag, p) in [("--prefs", &args.prefs), ("--prompts", &args.prompts), ("--chat-template", &args.chat_template)] {
        if let Some(p) = p {
            // a glob or a Hub dataset is resolved when read
            if let crate::data::sources::Spec::Path(_) = crate::data::sources::Spec::parse(&p.to_string_lossy())? {
                anyhow::ensure!(p.is_file(), "{flag} {}: no such file", p.display());
            }
        }
    }
    if let Some(dir) = &args.mmlu {
        let root = mmlu::data_root(dir)?;
        let known = mmlu::subjects(&root, Split::Test)?;
        for s in &args.subjects {
            if !known.contains(s) {
                // load_subject gives the message with close matches
                mmlu::load_subject(&root, s, Split::Test, Some(0))?;
            }
        }
    }
    if let Some(dir) = &args.adapter {
        anyhow::ensure!(dir.join("adapter_config.json").is_file(), "--adapter {}: no adapter_config.json in the folder", dir.display());
    }
    for f in [&args.out, &args.generations].into_iter().flatten() {
        check_parent(f)?;
    }
    anyhow::ensure!(args.beta > 0.0, "--beta must be > 0 (got {})", args.beta);
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be >= 1");
    anyhow::ensure!(args.max_length > 0, "--max-length must be >= 1");
    if args.prompts.is_some() {
        anyhow::ensure!(args.samples > 0, "--samples must be >= 1 (the number of prompts to generate from)");
        anyhow::ensure!(args.max_new_tokens > 0, "--max-new-tokens must be >= 1");
    }
    crate::generate::Sampler::new(&sampled_options(args))?;
    anyhow::ensure!(
        args.prefs.is_some() || args.prompts.is_some() || args.mmlu.is_some() || args.energy,
        "nothing to evaluate: give --prefs, --prompts, --mmlu or --energy"
    );
    Ok(())
}

fn sampled_options(args: &EvalArgs) -> GenerateOptions {
    GenerateOptions { max_new_tokens: args.max_new_tokens, temperature: args.temperature, top_p: args.top_p, seed: args.seed }
}

/// Attach the adapter in `dir` to `model`, whatever its kind (RoPO, PEFT LoRA, full; read from
/// its `adapter_config.json`).
fn attach_adapter(dir: &Path, model: &mut Model) -> anyhow::Result<()> {
    crate::adapter::AnyAdapterSet::load(dir, model).with_context(|| format!("loading adapter {}", dir.display()))?;
    Ok(())
}

/// Check, before any work, that the folder of `file` exists or can be created: its nearest
/// existing ancestor must be a folder. Nothing is created here (a failed run leaves no empty
/// folder behind); [`ensure_parent`] creates it just before the write.
fn check_parent(file: &Path) -> anyhow::Result<()> {
    let Some(parent) = file.parent() else { return Ok(()) };
    let existing = parent.ancestors().find(|a| a.as_os_str().is_empty() || a.exists());
    match existing {
        Some(a) if !a.as_os_str().is_empty() && !a.is_dir() => {
            anyhow::bail!("{}: cannot be written: {} is not a folder", file.display(), a.display())
        }
        _ => Ok(()),
    }
}

/// Create the folder that will hold `file` (just before writing it).
fn ensure_parent(file: &Path) -> anyhow::Result<()> {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::fs::create_dir_all(p).with_context(|| format!("creating the folder of {}", file.display()))
        }
        _ => Ok(()),
    }
}

/// Whether `path`'s first record is a preference pair rather than a prompt.
fn is_preference_file(path: &Path) -> anyhow::Result<bool> {
    const PAIR_KEYS: [&str; 4] = ["chosen", "rejected", "preferred_output", "non_preferred_output"];
    if path.extension().is_some_and(|e| e == "gz" || e == "json") {
        return Ok(true);
    }
    if crate::data::load::is_parquet(path) {
        let columns = crate::data::parquet::columns(path)?;
        return Ok(PAIR_KEYS.iter().any(|k| columns.0.contains_key(*k)));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(first) = text.lines().find(|l| !l.trim().is_empty()) else { return Ok(false) };
    let v: serde_json::Value = match serde_json::from_str(first) {
        Ok(v) => v,
        Err(_) => return Ok(false), // load_prompts reports it with file:line
    };
    Ok(PAIR_KEYS.iter().any(|k| v.get(k).is_some()))
}

/// The prompts to generate from: `(text, ids)`, at most `k`.
fn prompts(args: &EvalArgs, path: &Path, tok: &Tokenizer, template: Option<&str>) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    let spec = path.to_string_lossy();
    let is_prefs = match crate::data::sources::Spec::parse(&spec)? {
        crate::data::sources::Spec::Path(p) => is_preference_file(&p)?,
        _ => true,
    };
    let mut out: Vec<(String, Vec<u32>)> = if is_prefs {
        let loaded = crate::data::load_spec(&spec, &args.split, &Default::default())?;
        let path = loaded.source.as_path();
        let pt = PairTokenizer::new(tok, template, TokenizeOptions::default())?;
        let mut v = Vec::new();
        for ex in loaded.examples.iter().take(args.samples) {
            // a row the tokenizer refuses is no prompt either
            let Ok(e) = pt.encode(ex, path)? else { continue };
            v.push((pt.render_prompt(ex, path)?, e.prompt_ids));
        }
        v
    } else {
        load_prompts(path, tok, template)?.into_iter().map(|p| (p.text, p.ids)).collect()
    };
    out.truncate(args.samples);
    Ok(out)
}

/// One line of `generations.jsonl`.
fn generation_record(model: &str, mode: &str, i: usize, prompt: &str, g: &Generation) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "mode": mode,
        "index": i,
        "prompt": prompt,
        "completion": g.text,
        "tokens": counted_ids(g).len(),
        "stop": format!("{:?}", g.stop),
    })
}

/// Run `ropo eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    check_inputs(&args)?;
    // the MMLU files are read (and every row checked) before any model work
    let mmlu_data = match &args.mmlu {
        Some(dir) => {
            let root = mmlu::data_root(dir)?;
            Some(
                args.subjects
                    .iter()
                    .map(|s| mmlu::load_subject(&root, s, Split::Test, args.mmlu_limit))
                    .collect::<crate::error::Result<Vec<_>>>()?,
            )
        }
        None => None,
    };
    let dtype = match args.dtype.as_str() {
        "f64" => candle_core::DType::F64,
        "bf16" => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    };
    let mut lm = load(&args.model.path_or_id, &args.model.load_options(dtype)?).with_context(|| format!("loading model {}", args.model.path_or_id))?;
    if let Some(dir) = &args.adapter {
        attach_adapter(dir, &mut lm.model)?;
    }
    let (model, tok) = (&lm.model, &lm.tokenizer);
    let template = match &args.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let cols = columns(&args);
    let mut reports: Vec<ModelReport> = cols.iter().map(|_| ModelReport::default()).collect();
    let section = Section { args: &args, model, tok, template: template.as_deref(), cols: &cols };
    if let Some(path) = &args.prefs {
        section.preference_section(path, &mut reports)?;
    }
    let generations = match &args.prompts {
        Some(path) => Some(section.generation_section(path, &mut reports)?),
        None => None,
    };
    if let (true, Some(path)) = (args.drift, &args.prompts) {
        section.drift_section(path, &mut reports)?;
    }
    if let Some(data) = &mmlu_data {
        section.mmlu_section(data, &mut reports)?;
    }
    let energy = if args.energy { Some(energy_section(model)?) } else { None };
    let mut report = EvalReport {
        model: args.model.path_or_id.clone(),
        adapter: args.adapter.as_ref().map(|p| p.display().to_string()),
        energy,
        ..Default::default()
    };
    for ((name, _), r) in cols.iter().zip(reports) {
        if *name == "base" {
            report.base = Some(r);
        } else {
            report.adapted = Some(r);
        }
    }
    write_outputs(&args, &report, generations.as_ref())
}

/// What every section of `ropo eval` reads: the arguments, the model (with its adapter, when
/// given), its tokenizer, the chat template override, the columns measured.
#[derive(Clone, Copy)]
struct Section<'a> {
    args: &'a EvalArgs,
    model: &'a Model,
    tok: &'a Tokenizer,
    template: Option<&'a str>,
    cols: &'a [(&'static str, bool)],
}

impl Section<'_> {
    /// 1. Preference metrics: one pass gives policy (adapted) and reference (base) log-probs.
    fn preference_section(&self, path: &Path, reports: &mut [ModelReport]) -> anyhow::Result<()> {
        let Section { args, model, tok, template, cols } = *self;
        let opts = TokenizeOptions { max_length: Some(args.max_length), max_prompt_length: None };
        let mut prepared = crate::data::prepare_spec(&path.to_string_lossy(), &args.split, tok, template, &Default::default(), opts)?;
        if let Some(n) = args.limit {
            prepared.pairs.truncate(n);
        }
        anyhow::ensure!(
            !prepared.pairs.is_empty(),
            "{}: no usable preference pairs ({})",
            path.display(),
            prepared.report.to_string().lines().map(str::trim).collect::<Vec<_>>().join("; ")
        );
        let pad = crate::data::batch::pad_id(tok)?;
        // a model without adapters is its own reference: one pass
        let adapted = model.linears().iter().any(|l| l.adapter.is_some());
        let pass = if adapted { Pass::Both } else { Pass::Reference };
        let b = bar(prepared.pairs.len(), "preference pairs");
        let scores = score_pairs(model, &prepared.pairs, pad, args.batch_size, true, pass, |k| b.inc(k as u64))?;
        b.finish_and_clear();
        let (reference_chosen, reference_rejected) = scores.reference.clone().expect("a reference pass");
        let (chosen_tokens, rejected_tokens) = scores.tokens.clone();
        for ((_, use_adapters), r) in cols.iter().zip(reports.iter_mut()) {
            // the base model (adapters bypassed) is its own reference
            let (policy_chosen, policy_rejected) = match (&scores.policy, *use_adapters) {
                (Some(p), true) => p.clone(),
                _ => (reference_chosen.clone(), reference_rejected.clone()),
            };
            let lp = PairLogps {
                policy_chosen,
                policy_rejected,
                reference_chosen: reference_chosen.clone(),
                reference_rejected: reference_rejected.clone(),
                chosen_tokens: chosen_tokens.clone(),
                rejected_tokens: rejected_tokens.clone(),
            };
            r.preference = Some(preference_metrics(&lp, args.beta, DEFAULT_TOLERANCE)?);
        }
        Ok(())
    }

    /// 2. Generations, greedy and sampled: their statistics into `reports`; returns the
    /// `generations.jsonl` path and lines (written at the end, with the report).
    fn generation_section(&self, path: &Path, reports: &mut [ModelReport]) -> anyhow::Result<(PathBuf, String)> {
        let Section { args, model, tok, template, cols } = *self;
        let ps = prompts(args, path, tok, template)?;
        let ids: Vec<Vec<u32>> = ps.iter().map(|p| p.1.clone()).collect();
        let mut lines = String::new();
        for ((name, adapted), r) in cols.iter().zip(reports.iter_mut()) {
            for (mode, opts) in [("greedy", GenerateOptions { temperature: 0.0, ..sampled_options(args) }), ("sampled", sampled_options(args))] {
                let b = bar(ids.len(), &format!("{name} {mode} generations"));
                let gens = generate_all(model, tok, &ids, &opts, *adapted, || b.inc(1))?;
                b.finish_and_clear();
                for (i, g) in gens.iter().enumerate() {
                    lines.push_str(&generation_record(name, mode, i, &ps[i].0, g).to_string());
                    lines.push('\n');
                }
                let counted: Vec<Vec<u32>> = gens.iter().map(|g| counted_ids(g).to_vec()).collect();
                let stats = generation_stats(&counted, args.max_new_tokens);
                if mode == "greedy" {
                    r.greedy = Some(stats);
                } else {
                    r.sampled = Some(stats);
                }
            }
        }
        let out = args.generations.clone().unwrap_or_else(|| match &args.out {
            Some(o) => o.with_file_name("generations.jsonl"),
            None => PathBuf::from("generations.jsonl"),
        });
        Ok((out, lines))
    }

    /// 2b. Drift: the reference's greedy completions of the prompts, scored by each column.
    fn drift_section(&self, path: &Path, reports: &mut [ModelReport]) -> anyhow::Result<()> {
        let Section { args, model, tok, template, cols } = *self;
        let ids: Vec<Vec<u32>> = prompts(args, path, tok, template)?.into_iter().map(|p| p.1).collect();
        let completions = crate::eval::drift::reference_completions(model, tok, &ids, args.max_new_tokens)?;
        for ((_, adapted), r) in cols.iter().zip(reports.iter_mut()) {
            r.drift = Some(crate::eval::drift::drift(model, &ids, &completions, *adapted, args.batch_size)?);
        }
        Ok(())
    }

    /// 3. MMLU, each column scored on `data`.
    fn mmlu_section(&self, data: &[mmlu::SubjectData], reports: &mut [ModelReport]) -> anyhow::Result<()> {
        let Section { args, model, tok, cols, .. } = *self;
        let n: usize = data.iter().map(|d| d.questions.len()).sum();
        for ((name, adapted), r) in cols.iter().zip(reports.iter_mut()) {
            let mut scorer = ModelScorer::new(model, tok, *adapted, Some(args.mmlu_max_tokens))?;
            let b = bar(n, &format!("{name} MMLU questions"));
            r.mmlu = Some(match args.mmlu_format {
                mmlu::MmluFormat::Letter => mmlu::score(data, args.shots, &mut scorer, || b.inc(1))?,
                mmlu::MmluFormat::Cloze => mmlu::score_cloze(data, args.shots, &mut scorer, || b.inc(1))?,
            });
            b.finish_and_clear();
        }
        Ok(())
    }
}

/// 4. Hyperspherical energy of the adapted layers.
fn energy_section(model: &Model) -> anyhow::Result<crate::eval::EnergyReport> {
    let linears = model.linears();
    let n = linears.iter().filter(|l| l.adapter.is_some()).count();
    anyhow::ensure!(n > 0, "--energy: the model has no adapted layer");
    let b = bar(n, "energy of adapted layers");
    let e = crate::eval::energy::adapted_energies(linears, |_| b.inc(1))?;
    b.finish_and_clear();
    Ok(e)
}

/// The table on stdout, then the generations and the JSON report (when asked for).
fn write_outputs(args: &EvalArgs, report: &EvalReport, generations: Option<&(PathBuf, String)>) -> anyhow::Result<()> {
    print!("{}", report.table());
    if let Some((out, lines)) = generations {
        ensure_parent(out)?;
        crate::fsutil::write_atomic(out, lines.as_bytes())?;
        eprintln!("wrote {} generations to {}", lines.lines().count(), out.display());
    }
    if let Some(out) = &args.out {
        ensure_parent(out)?;
        report.write_json(out)?;
        println!("report: {}", out.display());
    }
    Ok(())
}

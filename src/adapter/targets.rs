//! Which linears an adapter of any kind wraps: [`TargetModules`] (names or one regex) and its
//! [`ModuleMatcher`], the run config's `adapter.target_modules` resolved for a model, and the
//! selection of the matching linears.
//!
//! Shared by every method ([`super::ropo`], [`super::lora`], [`super::full`]): no match is an
//! error naming the patterns; a layer that already has an adapter is refused; a tied `lm_head`
//! is refused.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::config::ALL_LINEAR;
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// Which linear layers get an adapter.
///
/// JSON/TOML: a list of names (`["q_proj", "v_proj"]`) matched against the LAST path component
/// (`model.layers.3.self_attn.q_proj` -> `q_proj`), or one string, a regex matched against the
/// WHOLE path (anchored, as PEFT's `re.fullmatch`), e.g. `"model\\.layers\\.[0-3]\\..*_proj"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names, matched against the last path component.
    Names(Vec<String>),
    /// A regex over full module paths (anchored at both ends).
    Regex(String),
}

impl TargetModules {
    /// A matcher for module paths. Errors: an invalid regex ([`Error::Config`] naming the key).
    pub fn matcher(&self) -> Result<ModuleMatcher> {
        Ok(match self {
            TargetModules::Names(n) => ModuleMatcher::Names(n.clone()),
            TargetModules::Regex(re) => ModuleMatcher::Regex(
                Regex::new(&format!("^(?:{re})$"))
                    .map_err(|e| Error::Config(format!("adapter.target_modules is not a valid regex ({re:?}): {e}")))?,
            ),
        })
    }
}

impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetModules::Names(n) => write!(f, "names [{}]", n.join(", ")),
            TargetModules::Regex(r) => write!(f, "regex {r:?}"),
        }
    }
}

/// A compiled [`TargetModules`].
#[derive(Debug, Clone)]
pub enum ModuleMatcher {
    Names(Vec<String>),
    Regex(Regex),
}

impl ModuleMatcher {
    /// Whether the module at `path` (e.g. `model.layers.0.self_attn.q_proj`) is targeted.
    pub fn is_match(&self, path: &str) -> bool {
        match self {
            ModuleMatcher::Names(names) => {
                let last = path.rsplit('.').next().unwrap_or(path);
                names.iter().any(|n| n == last)
            }
            ModuleMatcher::Regex(re) => re.is_match(path),
        }
    }
}

/// Whether `s` is a plain module name (`q_proj`): ASCII letters, digits and `_` only.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The [`TargetModules`] of a run config's `adapter.target_modules` list for `model`.
///
/// - `["all-linear"]`: every linear of the decoder layers, not `lm_head` (PEFT's
///   `"all-linear"`), resolved to the module names of `model` in model order
///   (`q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj` for Llama/Qwen2), so a
///   saved adapter config lists them as PEFT does;
/// - only plain names: [`TargetModules::Names`] (matched against the last path component);
/// - one regex: [`TargetModules::Regex`] over full paths (anchored);
/// - a mix: one regex, the alternation of the entries, a plain name `n` becoming `(?:.*\.)?n`.
///
/// Errors: an empty list ([`Error::Config`]).
pub fn resolve(list: &[String], model: &Model) -> Result<TargetModules> {
    resolve_paths(list, model.linears().iter().map(|l| l.path.as_str()), &model.lm_head.path)
}

/// [`resolve`] over the module paths `paths` (in model order) with `lm_head` the output layer's path.
pub fn resolve_paths<'a>(list: &[String], paths: impl Iterator<Item = &'a str>, lm_head: &str) -> Result<TargetModules> {
    if list.is_empty() {
        return Err(Error::Config("adapter.target_modules must list at least one module".into()));
    }
    if list.len() == 1 && list[0] == ALL_LINEAR {
        let mut names: Vec<String> = Vec::new();
        for p in paths.filter(|p| *p != lm_head) {
            let last = p.rsplit('.').next().unwrap_or(p).to_string();
            if !names.contains(&last) {
                names.push(last);
            }
        }
        return Ok(TargetModules::Names(names));
    }
    if list.iter().all(|s| is_plain_name(s)) {
        return Ok(TargetModules::Names(list.to_vec()));
    }
    if list.len() == 1 {
        return Ok(TargetModules::Regex(list[0].clone()));
    }
    let alts: Vec<String> =
        list.iter().map(|s| if is_plain_name(s) { format!("(?:.*\\.)?{s}") } else { format!("(?:{s})") }).collect();
    Ok(TargetModules::Regex(alts.join("|")))
}

/// The indices into `linears` (model order) whose path `targets` matches.
///
/// Errors ([`Error::Config`]): an invalid regex; no module matched (naming the patterns and
/// some module paths); a matched linear that already has an adapter.
pub fn select(linears: &[&mut Linear], targets: &TargetModules) -> Result<Vec<usize>> {
    let matcher = targets.matcher()?;
    let mut out = Vec::new();
    for (i, lin) in linears.iter().enumerate() {
        if !matcher.is_match(&lin.path) {
            continue;
        }
        if lin.adapter.is_some() {
            return Err(Error::Config(format!("{} already has an adapter attached", lin.path)));
        }
        out.push(i);
    }
    if out.is_empty() {
        let seen: Vec<&str> = linears.iter().take(8).map(|l| l.path.as_str()).collect();
        return Err(Error::Config(format!(
            "adapter.target_modules ({targets}) matched no module of the model; its modules look like: {}",
            seen.join(", ")
        )));
    }
    Ok(out)
}

/// Refuse a tied `lm_head` among the targets: its weight IS the embedding matrix, so a trained
/// or merged lm_head could not be written back as one tensor.
pub fn check_tied(model: &Model, targets: &TargetModules) -> Result<()> {
    if model.config().tie_word_embeddings && targets.matcher()?.is_match(&model.lm_head.path) {
        return Err(Error::Config(format!(
            "adapter.target_modules ({targets}) matches {}, whose weight is tied to the embeddings; leave it out",
            model.lm_head.path
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATHS: [&str; 5] =
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "lm_head"];

    fn r(list: &[&str]) -> TargetModules {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        resolve_paths(&list, PATHS.iter().copied(), "lm_head").unwrap()
    }

    #[test]
    fn resolves_names_regexes_mixes_and_all_linear() {
        assert_eq!(r(&["q_proj", "v_proj"]), TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
        assert_eq!(r(&["all-linear"]), TargetModules::Names(vec!["q_proj".into(), "v_proj".into(), "up_proj".into()]));
        assert_eq!(r(&[r"model\.layers\.1\..*"]), TargetModules::Regex(r"model\.layers\.1\..*".into()));
        let mixed = r(&["up_proj", r"model\.layers\.1\..*"]).matcher().unwrap();
        let hits: Vec<&str> = PATHS.iter().copied().filter(|p| mixed.is_match(p)).collect();
        assert_eq!(hits, ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]);
        assert!(resolve_paths(&[], PATHS.iter().copied(), "lm_head").is_err());
    }

    #[test]
    fn select_refuses_no_match_and_double_wrapping() {
        let w = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut ls: Vec<Linear> = PATHS.iter().map(|p| Linear::new(*p, w.clone(), None)).collect();
        let refs: Vec<&mut Linear> = ls.iter_mut().collect();
        assert_eq!(select(&refs, &TargetModules::Names(vec!["q_proj".into()])).unwrap(), [0, 3]);
        let e = select(&refs, &TargetModules::Names(vec!["c_attn".into()])).unwrap_err().to_string();
        assert!(e.contains("c_attn") && e.contains("matched no module"), "{e}");
    }
}

//! Hub repo ids (`org/name`, optionally at a revision) through the hf-hub 1.0 blocking client.
//!
//! The cache follows HF's layout: `$HF_HUB_CACHE` or `$HF_HOME/hub` (default
//! `~/.cache/huggingface/hub`), `models--org--name/snapshots/<commit>/<file>`, with
//! `refs/<branch>` holding the commit. `HF_HUB_OFFLINE` (1/true/yes/on, as `huggingface_hub`
//! reads it) makes every lookup cache-only (`local_files_only`).

use std::path::{Path, PathBuf};

use hf_hub::{HFClientSync, HFError};

use crate::error::{Error, Result};

/// Whether `HF_HUB_OFFLINE` asks for cache-only lookups (`huggingface_hub`'s `_is_true`).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").map(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")).unwrap_or(false)
}

/// `msg` with the value of `HF_TOKEN` (and `HUGGING_FACE_HUB_TOKEN`), should a client error
/// echo it, replaced by `<HF_TOKEN>`: a token never reaches an error, a log record or a file.
pub fn redact_token(msg: &str) -> String {
    let mut out = msg.to_string();
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Ok(t) = std::env::var(var) {
            let t = t.trim();
            if t.len() >= 4 {
                out = out.replace(t, "<HF_TOKEN>");
            }
        }
    }
    out
}

/// Whether `s` has the shape of a hub repo id: `name` or `owner/name`, each of
/// `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn looks_like_repo_id(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty() && !p.starts_with(['.', '-']) && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    let parts: Vec<&str> = s.split('/').collect();
    matches!(parts.len(), 1 | 2) && parts.iter().all(|p| part_ok(p)) && !s.ends_with(".gguf")
}

/// Where the hub cache is and whether to stay offline; [`HubSettings::from_env`] reads them the
/// way `huggingface_hub` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The hub cache folder (`models--org--name/...` lives directly under it).
    pub cache_dir: PathBuf,
    /// Cache only: never touch the network.
    pub offline: bool,
}

impl HubSettings {
    /// `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub` (default
    /// `~/.cache/huggingface/hub`); offline per [`offline`] (`HF_HUB_OFFLINE`).
    pub fn from_env() -> Self {
        Self { cache_dir: hf_hub::resolve_cache_dir(), offline: offline() }
    }
}

/// [`snapshot_with`] with [`HubSettings::from_env`].
pub fn snapshot(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    snapshot_with(repo_id, revision, &HubSettings::from_env())
}

/// Fetch (or find in the cache) the files of an HF model folder for `repo_id` at `revision`
/// (default `main`) and return the snapshot folder holding them.
///
/// Downloads `config.json`, `tokenizer.json`, then `model.safetensors` or
/// `model.safetensors.index.json` and its shards; `tokenizer_config.json`,
/// `generation_config.json` and `chat_template.jinja` when the repo has them.
///
/// Errors: the repo/revision/file is not found (offline: not in the cache), network errors.
pub fn snapshot_with(repo_id: &str, revision: Option<&str>, settings: &HubSettings) -> Result<PathBuf> {
    let client = hf_hub::HFClient::builder()
        .cache_dir(settings.cache_dir.clone())
        .build()
        .and_then(HFClientSync::from_inner)
        .map_err(|e| Error::Msg(redact_token(&format!("hub client for {repo_id}: {e}"))))?;
    let (owner, name) = hf_hub::split_id(repo_id);
    let repo = client.model(owner, name);
    let offline = settings.offline;
    let cache_dir = &settings.cache_dir;
    let rev = revision.unwrap_or("main").to_string();
    let where_ = || {
        let mode = if offline { " (HF_HUB_OFFLINE is set: cache only)" } else { "" };
        format!("{repo_id}@{rev} (cache {}){mode}", cache_dir.display())
    };
    let fetch = |file: &str| -> Result<Option<PathBuf>> {
        let res = repo.download_file().filename(file).revision(rev.clone()).local_files_only(offline).send();
        match res {
            Ok(p) => Ok(Some(p)),
            Err(HFError::EntryNotFound { .. } | HFError::LocalEntryNotFound { .. }) => Ok(None),
            Err(e) => Err(Error::Msg(redact_token(&format!("hub {}: {file}: {e}", where_())))),
        }
    };
    let required = |file: &str| -> Result<PathBuf> {
        fetch(file)?.ok_or_else(|| Error::Msg(format!("hub {}: {file} not found", where_())))
    };
    let config = required("config.json")?;
    let folder = config.parent().map(Path::to_path_buf).unwrap_or_default();
    required("tokenizer.json")?;
    for optional in ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"] {
        fetch(optional)?;
    }
    if fetch("model.safetensors")?.is_none() {
        let index = fetch("model.safetensors.index.json")?
            .ok_or_else(|| Error::Msg(format!("hub {}: neither model.safetensors nor model.safetensors.index.json found", where_())))?;
        let text = std::fs::read_to_string(&index).map_err(|e| Error::input(&index, None, format!("cannot read: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::input(&index, Some(e.line()), format!("invalid JSON: {e}")))?;
        let shards: std::collections::BTreeSet<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|f| f.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        for s in shards {
            required(&s)?;
        }
    }
    Ok(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_id_shapes() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_repo_id("gpt2"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("model.gguf"));
        assert!(!looks_like_repo_id("../x"));
    }
}

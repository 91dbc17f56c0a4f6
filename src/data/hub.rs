//! Hub datasets: `hf://datasets/ORG/NAME[@REVISION][/PATTERN]` resolved to local files of one
//! split, downloaded into (or found in) the HF cache with the hf-hub client, the same client and
//! cache `ropo` resolves model ids with ([`crate::model::hub`]).
//!
//! The repo's files are listed (online: the Hub's tree API, recursive; offline, with
//! `HF_HUB_OFFLINE=1`, or when the Hub cannot be reached: the cached snapshot of the revision,
//! `datasets--ORG--NAME/snapshots/<commit>/`, the commit read from `refs/<revision>`), the split's
//! data files chosen ([`split_files`]), and each fetched with the client's `download_file`
//! (`local_files_only` when offline), which honours `HF_TOKEN`. A `/PATTERN` after the name (as in
//! `datasets`' `hf://` paths, e.g. `hf://datasets/ORG/NAME/data/train-*.parquet`) picks files by a
//! glob instead of a split.

use std::path::{Path, PathBuf};

use hf_hub::{HFClientSync, HFError};

use crate::error::{Error, Result};
use crate::model::hub::{redact_token, HubSettings};

/// The URL prefix of a Hub dataset.
pub const PREFIX: &str = "hf://datasets/";

/// File name endings of the data files a split is made of (what [`super::load()`] reads).
pub const DATA_EXTENSIONS: [&str; 5] = [".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz"];

/// A parsed `hf://datasets/ORG/NAME[@REVISION][/PATTERN]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    /// `ORG/NAME`.
    pub repo: String,
    /// The branch, tag or commit; `None` = `main`.
    pub revision: Option<String>,
    /// A glob over the repo's file paths (`data/*.parquet`) replacing the split selection.
    pub pattern: Option<String>,
}

impl DatasetRef {
    /// Parse `spec`; `None` when it does not start with [`PREFIX`].
    ///
    /// Errors: no `ORG/NAME` after the prefix, an empty revision.
    pub fn parse(spec: &str) -> Option<std::result::Result<Self, String>> {
        let rest = spec.strip_prefix(PREFIX)?;
        let bad = |why: &str| Some(Err(format!("{spec:?}: {why} (expected hf://datasets/ORG/NAME[@REVISION][/PATTERN])")));
        let mut parts = rest.splitn(3, '/');
        let (Some(org), Some(name_rev)) = (parts.next(), parts.next()) else { return bad("no dataset name") };
        let pattern = parts.next().filter(|p| !p.is_empty()).map(str::to_string);
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) if r.is_empty() => return bad(&format!("empty revision after {n}@")),
            Some((n, r)) => (n, Some(r.to_string())),
            None => (name_rev, None),
        };
        let repo = format!("{org}/{name}");
        if org.is_empty() || name.is_empty() || !crate::model::hub::looks_like_repo_id(&repo) {
            return bad("not an ORG/NAME dataset id");
        }
        Some(Ok(DatasetRef { repo, revision, pattern }))
    }

    /// `ORG/NAME@REVISION` (revision `main` when unset).
    pub fn display(&self) -> String {
        format!("{}@{}", self.repo, self.revision.as_deref().unwrap_or("main"))
    }
}

/// The files of `split` of a dataset as `datasets` picks them (`datasets/data_files.py`,
/// `_get_data_files_patterns`, its default patterns and order of precedence), as repo paths,
/// sorted:
/// 1. the Hub's sharded layout `data/<split>-NNNNN-of-NNNNN*.*` (`SPLIT_PATTERN_SHARDED`; where any
///    file has that form, the splits are exactly those names: `train_prefs`, `test`, ...);
/// 2. else folders named for a split (`DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME`: `**/train/**`,
///    `**/*[-._ 0-9]train[-._ 0-9]*/**`, ...);
/// 3. else file names holding a split's keyword between separators
///    (`DEFAULT_PATTERNS_SPLIT_IN_FILENAME`: `**/train[-._ 0-9]*`, `**/*[-._ 0-9]train[-._ 0-9]*`);
/// 4. else every data file is `train` (`DEFAULT_PATTERNS_ALL`).
///
/// The keywords are `datasets`' (`train`, `training`; `validation`, `valid`, `dev`, `val`;
/// `test`, `testing`, `eval`, `evaluation`); another split name is its own keyword in steps 2-3
/// (an extension: `datasets` knows only those three there). Hidden paths (a component starting
/// with `.` or `__`) and files not ending in one of [`DATA_EXTENSIONS`] never count.
pub fn split_files(files: &[String], split: &str) -> Vec<String> {
    let data: Vec<&String> = files.iter().filter(|f| is_data_file(f)).collect();
    let sharded: Vec<&String> = data.iter().copied().filter(|f| sharded_split(f).is_some()).collect();
    let mut out: Vec<String> = if !sharded.is_empty() {
        sharded.into_iter().filter(|f| sharded_split(f) == Some(split)).cloned().collect()
    } else {
        let mut splits: Vec<&str> = KNOWN_SPLITS.to_vec();
        if !splits.contains(&split) {
            splits.push(split);
        }
        let pick = |dirs: bool, s: &str| -> Vec<String> {
            data.iter().filter(|f| keyword_patterns(s, dirs).iter().any(|p| matches(p, f))).map(|f| f.to_string()).collect()
        };
        let step = |dirs: bool| splits.iter().any(|s| !pick(dirs, s).is_empty());
        if step(true) {
            pick(true, split)
        } else if step(false) {
            pick(false, split)
        } else if split == "train" {
            data.iter().map(|f| f.to_string()).collect()
        } else {
            Vec::new()
        }
    };
    out.sort();
    out
}

/// The split names the repo's files show (for the "no such split" error).
pub fn available_splits(files: &[String]) -> Vec<String> {
    let mut names: Vec<String> = files.iter().filter(|f| is_data_file(f)).filter_map(|f| sharded_split(f).map(str::to_string)).collect();
    if names.is_empty() {
        names = KNOWN_SPLITS.iter().filter(|s| !split_files(files, s).is_empty()).map(|s| s.to_string()).collect();
    }
    names.sort();
    names.dedup();
    names
}

const KNOWN_SPLITS: [&str; 3] = ["train", "validation", "test"];

/// `datasets`' `SPLIT_KEYWORDS`.
fn keywords(split: &str) -> Vec<&str> {
    match split {
        "train" => vec!["train", "training"],
        "validation" => vec!["validation", "valid", "dev", "val"],
        "test" => vec!["test", "testing", "eval", "evaluation"],
        other => vec![other],
    }
}

/// `KEYWORDS_IN_DIR_NAME_BASE_PATTERNS` (`dirs`) or `KEYWORDS_IN_FILENAME_BASE_PATTERNS` for the
/// keywords of `split`, with `datasets`' separators `[-._ 0-9]`.
fn keyword_patterns(split: &str, dirs: bool) -> Vec<String> {
    const SEP: &str = "[-._ 0-9]";
    let bases: &[&str] = if dirs {
        &["**/{k}/**", "**/{k}{s}*/**", "**/*{s}{k}/**", "**/*{s}{k}{s}*/**"]
    } else {
        &["**/{k}{s}*", "**/*{s}{k}{s}*"]
    };
    keywords(split).iter().flat_map(|k| bases.iter().map(move |b| b.replace("{k}", k).replace("{s}", SEP))).collect()
}

/// fsspec-style glob matching: `*` stays within a path component, `**` spans components.
fn matches(pattern: &str, path: &str) -> bool {
    let opts = glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: true };
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches_with(path, opts))
}

fn is_data_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    !path.split('/').any(|c| c.starts_with('.') || c.starts_with("__")) && DATA_EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// `<split>` of `data/<split>-NNNNN-of-NNNNN*.*` (`SPLIT_PATTERN_SHARDED`).
fn sharded_split(path: &str) -> Option<&str> {
    static SHARD: std::sync::LazyLock<regex::Regex> =
        std::sync::LazyLock::new(|| regex::Regex::new(r"^data/([^/]+?)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*$").expect("valid regex"));
    SHARD.captures(path).and_then(|c| c.get(1)).map(|m| m.as_str())
}

/// The local paths of `split`'s files of `dataset` (or of its pattern's files), in repo path
/// order, downloaded into the cache unless `settings.offline`.
///
/// Errors: the repo or revision does not exist (online), is not in the cache (offline, or the
/// Hub unreachable), no file of the split (naming the splits there are), a download failing.
pub fn resolve(dataset: &DatasetRef, split: &str, settings: &HubSettings) -> Result<Vec<PathBuf>> {
    let client = hf_hub::HFClient::builder()
        .cache_dir(settings.cache_dir.clone())
        .build()
        .and_then(HFClientSync::from_inner)
        .map_err(|e| Error::Msg(redact_token(&format!("hub client for dataset {}: {e}", dataset.repo))))?;
    let (owner, name) = hf_hub::split_id(&dataset.repo);
    let repo = client.dataset(owner, name);
    let rev = dataset.revision.clone().unwrap_or_else(|| "main".into());
    let where_ = || {
        let mode = if settings.offline { " (HF_HUB_OFFLINE is set: cache only)" } else { "" };
        format!("hub dataset {} (cache {}){mode}", dataset.display(), settings.cache_dir.display())
    };
    let files = if settings.offline {
        cached_files(&settings.cache_dir, dataset)?.ok_or_else(|| Error::Msg(format!("{}: not in the cache", where_())))?
    } else {
        match repo.list_tree().revision(rev.clone()).recursive(true).send() {
            Ok(entries) => entries
                .into_iter()
                .filter_map(|e| match e {
                    hf_hub::repository::RepoTreeEntry::File { path, .. } => Some(path),
                    _ => None,
                })
                .collect(),
            Err(e @ (HFError::RepoNotFound { .. } | HFError::RevisionNotFound { .. })) => {
                return Err(Error::Msg(redact_token(&format!("{}: {e}", where_()))))
            }
            Err(e) => match cached_files(&settings.cache_dir, dataset)? {
                Some(files) => {
                    tracing::warn!("{}: cannot list the repo ({}); using the cached snapshot", where_(), redact_token(&e.to_string()));
                    files
                }
                None => return Err(Error::Msg(redact_token(&format!("{}: {e}", where_())))),
            },
        }
    };
    let chosen = match &dataset.pattern {
        Some(p) => {
            let pat = glob::Pattern::new(p).map_err(|e| Error::Msg(format!("{}: bad pattern {p:?}: {e}", where_())))?;
            let mut m: Vec<String> = files.iter().filter(|f| pat.matches(f)).cloned().collect();
            m.sort();
            m
        }
        None => split_files(&files, split),
    };
    if chosen.is_empty() {
        let what = match &dataset.pattern {
            Some(p) => format!("no file matches {p:?}"),
            None => format!("no split {split:?} (splits there: {})", list_or_none(&available_splits(&files))),
        };
        return Err(Error::Msg(format!("{}: {what}", where_())));
    }
    chosen
        .iter()
        .map(|f| {
            repo.download_file()
                .filename(f.clone())
                .revision(rev.clone())
                .local_files_only(settings.offline)
                .send()
                .map_err(|e| Error::Msg(redact_token(&format!("{}: {f}: {e}", where_()))))
        })
        .collect()
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The repo paths of the cached snapshot of `dataset`'s revision; `None` when it is not cached.
///
/// Errors: an unreadable snapshot folder.
pub fn cached_files(cache_dir: &Path, dataset: &DatasetRef) -> Result<Option<Vec<String>>> {
    let folder = cache_dir.join(format!("datasets--{}", dataset.repo.replace('/', "--")));
    let rev = dataset.revision.as_deref().unwrap_or("main");
    let commit = if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        rev.to_string()
    } else {
        match std::fs::read_to_string(folder.join("refs").join(rev)) {
            Ok(s) => s.trim().to_string(),
            Err(_) => return Ok(None),
        }
    };
    let snapshot = folder.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Ok(None);
    }
    let mut out = Vec::new();
    walk(&snapshot, &snapshot, &mut out)?;
    out.sort();
    Ok(Some(out))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::input(dir, None, format!("cannot read the cached snapshot: {e}")))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::input(dir, None, format!("cannot read the cached snapshot: {e}")))?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_repo_revision_and_pattern() {
        let d = DatasetRef::parse("hf://datasets/trl-lib/ultrafeedback_binarized").unwrap().unwrap();
        assert_eq!((d.repo.as_str(), d.revision, d.pattern), ("trl-lib/ultrafeedback_binarized", None, None));
        let d = DatasetRef::parse("hf://datasets/a/b@v1.0/data/*.parquet").unwrap().unwrap();
        assert_eq!((d.revision.as_deref(), d.pattern.as_deref()), (Some("v1.0"), Some("data/*.parquet")));
        assert!(DatasetRef::parse("data/x.jsonl").is_none());
        assert!(DatasetRef::parse("hf://datasets/onlyorg").unwrap().is_err());
        assert!(DatasetRef::parse("hf://datasets/a/b@").unwrap().is_err());
    }

    #[test]
    fn hub_parquet_layout_names_the_splits() {
        let f = files(&[
            "README.md",
            ".gitattributes",
            "data/train_prefs-00000-of-00001.parquet",
            "data/test_prefs-00000-of-00001.parquet",
            "data/train_gen-00000-of-00002.parquet",
            "data/train_gen-00001-of-00002.parquet",
        ]);
        assert_eq!(split_files(&f, "train_prefs"), files(&["data/train_prefs-00000-of-00001.parquet"]));
        assert_eq!(split_files(&f, "train_gen").len(), 2);
        assert!(split_files(&f, "train").is_empty());
        assert_eq!(available_splits(&f), files(&["test_prefs", "train_gen", "train_prefs"]));
    }

    #[test]
    fn folders_names_and_the_train_default() {
        let f = files(&["default/train/0000.parquet", "default/test/0000.parquet", "default/train/0001.parquet"]);
        assert_eq!(split_files(&f, "train"), files(&["default/train/0000.parquet", "default/train/0001.parquet"]));
        assert_eq!(split_files(&f, "test"), files(&["default/test/0000.parquet"]));
        let f = files(&["train.jsonl", "dev.jsonl", "notes.txt"]);
        assert_eq!(split_files(&f, "train"), files(&["train.jsonl"]));
        assert_eq!(split_files(&f, "validation"), files(&["dev.jsonl"]));
        assert_eq!(available_splits(&f), files(&["train", "validation"]));
        let f = files(&["prefs.jsonl", "more/prefs2.parquet"]);
        assert_eq!(split_files(&f, "train"), files(&["more/prefs2.parquet", "prefs.jsonl"]));
        assert!(split_files(&f, "test").is_empty());
    }
}

//! Data file specs, as `data.train_files`, `data.eval_file`, `ropo eval --prefs/--prompts` and
//! `ropo data inspect` take them, resolved to the files to read, in order:
//! - a path: that file (`.jsonl`, `.json`, optionally `.gz`, or `.parquet`);
//! - a shell glob (`data/*.parquet`, `shards/train-*.jsonl`): the matching files, sorted by path
//!   (as `datasets`' `data_files` patterns);
//! - a Hub dataset `hf://datasets/ORG/NAME[@REVISION][/PATTERN]`: the files of one split
//!   ([`super::hub`]).

use std::path::PathBuf;

use super::hub::{self, DatasetRef};
use crate::error::{Error, Result};
use crate::model::hub::HubSettings;

/// What a spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// One file.
    Path(PathBuf),
    /// A shell glob.
    Glob(String),
    /// A Hub dataset.
    Hub(DatasetRef),
}

impl Spec {
    /// Parse `spec`. Errors: a malformed `hf://datasets/...` (named).
    pub fn parse(spec: &str) -> Result<Spec> {
        if let Some(d) = DatasetRef::parse(spec) {
            return d.map(Spec::Hub).map_err(Error::Config);
        }
        if spec.contains(['*', '?', '[']) {
            return Ok(Spec::Glob(spec.to_string()));
        }
        Ok(Spec::Path(PathBuf::from(spec)))
    }

    /// True for a Hub dataset.
    pub fn is_hub(&self) -> bool {
        matches!(self, Spec::Hub(_))
    }
}

/// The files `spec` names; `split` picks a Hub dataset's files (ignored otherwise). A path is
/// returned as given (a missing file fails when it is read, naming it).
///
/// Errors: a malformed hub spec or glob, a glob matching no file, the errors of
/// [`hub::resolve`] (with [`HubSettings::from_env`]).
pub fn resolve(spec: &str, split: &str) -> Result<Vec<PathBuf>> {
    match Spec::parse(spec)? {
        Spec::Path(p) => Ok(vec![p]),
        Spec::Glob(g) => {
            let paths = glob::glob(&g).map_err(|e| Error::input(&g, None, format!("bad file pattern: {e}")))?;
            let mut files = Vec::new();
            for p in paths {
                let p = p.map_err(|e| Error::input(e.path(), None, format!("cannot read: {}", e.error())))?;
                if p.is_file() {
                    files.push(p);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(Error::input(&g, None, "no file matches the pattern"));
            }
            Ok(files)
        }
        Spec::Hub(d) => hub::resolve(&d, split, &HubSettings::from_env()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_by_shape() {
        assert_eq!(Spec::parse("a/b.jsonl").unwrap(), Spec::Path("a/b.jsonl".into()));
        assert_eq!(Spec::parse("data/*.parquet").unwrap(), Spec::Glob("data/*.parquet".into()));
        assert!(Spec::parse("hf://datasets/org/name").unwrap().is_hub());
        assert!(Spec::parse("hf://datasets/org").is_err());
    }

    #[test]
    fn a_glob_matching_nothing_is_an_error() {
        let e = resolve("/nonexistent-dir-ropo/*.parquet", "train").unwrap_err().to_string();
        assert_eq!(e, "/nonexistent-dir-ropo/*.parquet: no file matches the pattern");
    }
}

//! Typed errors of the library. Commands add context at the edge; `main` prints `ropo: {err:#}`.

use std::path::PathBuf;

/// Errors that carry where the problem is: a file (and line, field), or a tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem in an input file, at a line (1-based) when known.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Input { path: PathBuf, line: Option<usize>, msg: String },
    /// A problem in an input file at a line and column (both 1-based), e.g. malformed JSON.
    #[error("{}:{line}:{column}: {msg}", path.display())]
    InputAt { path: PathBuf, line: usize, column: usize, msg: String },
    /// A tensor whose shape does not match what the model expects.
    #[error("shape mismatch for {name}: expected {expected:?}, got {got:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    /// An invalid configuration value: `training.beta must be > 0 (got -0.1)`.
    #[error("{0}")]
    Config(String),
    /// A missing tensor in a checkpoint or adapter file.
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// An error about `path` (optionally at `line`).
    pub fn input(path: impl Into<PathBuf>, line: Option<usize>, msg: impl Into<String>) -> Self {
        Error::Input { path: path.into(), line, msg: msg.into() }
    }

    /// An error about `path` at `line`:`column` (1-based).
    pub fn input_at(path: impl Into<PathBuf>, line: usize, column: usize, msg: impl Into<String>) -> Self {
        Error::InputAt { path: path.into(), line, column, msg: msg.into() }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Atomic writes: write to a temporary sibling, fsync, then rename, so a failure never leaves
//! a half-written file behind; and the bytes of a safetensors file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::error::{Error, Result};

/// The temporary sibling used while writing `path`: `.NAME.tmp-PID`.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `bytes` to `path` atomically (temporary file in the same folder, then rename).
///
/// Errors: any I/O error, with the path named; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_sibling(path);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// Named tensors as safetensors bytes (safetensors sorts the tensors itself, so the bytes depend
/// only on the names and values; `metadata` must have at most one entry for the same to hold).
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let views: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.contiguous()?))).collect::<candle_core::Result<_>>()?;
    safetensors::tensor::serialize(views.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| Error::Msg(format!("serialising safetensors: {e}")))
}

//! A run's fingerprint: what data-parallel ranks compare at start
//! ([`crate::collective::check_same`]) so that a rank with another config, another model or
//! another checkpoint is refused before training.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{hub, Source};
use crate::error::{Error, Result};

/// Bytes read from each end of a model file.
const SAMPLE: u64 = 1 << 20;

/// sha256 over the resolved config (`config_toml`), the resume step, and the files of the model
/// `source` and of the separate `reference` (when set): for each file, in name order, its name,
/// its length and its first and last MiB (GGUF and safetensors headers, with every tensor's
/// name, dtype, shape and offset, sit at the start). Reading two MiB a file keeps it cheap for
/// multi-GB models; two checkpoints that differ only inside their tensor data's middle are not
/// told apart.
///
/// Errors: a model source that cannot be resolved or a file that cannot be read (named).
pub fn run_fingerprint(config_toml: &str, source: &str, reference: Option<&str>, revision: &str, resume_step: Option<u64>) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(config_toml.as_bytes());
    part(&resume_step.map_or(u64::MAX, |s| s).to_le_bytes());
    for src in std::iter::once(source).chain(reference) {
        for f in model_files(src, revision)? {
            part(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            file_sample(&f, &mut part)?;
        }
    }
    Ok(h.finalize().into())
}

/// The files a model source is read from, in name order: the `.gguf` file, or the folder's
/// (or hub snapshot's) files.
fn model_files(source: &str, revision: &str) -> Result<Vec<PathBuf>> {
    let dir = match Source::parse(source)? {
        Source::Gguf(p) => return Ok(vec![p]),
        Source::HfFolder(d) => d,
        Source::Hub(id) => hub::snapshot(&id, Some(revision))?,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| Error::input(&dir, None, format!("reading the model folder: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn file_sample(path: &Path, part: &mut impl FnMut(&[u8])) -> Result<()> {
    let err = |e: std::io::Error| Error::input(path, None, format!("reading for the run's fingerprint: {e}"));
    let mut f = std::fs::File::open(path).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    part(&len.to_le_bytes());
    let mut buf = Vec::new();
    (&mut f).take(SAMPLE).read_to_end(&mut buf).map_err(err)?;
    part(&buf);
    if len > 2 * SAMPLE {
        f.seek(SeekFrom::Start(len - SAMPLE)).map_err(err)?;
        buf.clear();
        f.take(SAMPLE).read_to_end(&mut buf).map_err(err)?;
        part(&buf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_config_step_and_model_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.gguf");
        std::fs::write(&m, vec![7u8; 3 << 20]).unwrap();
        let src = m.to_str().unwrap();
        let a = run_fingerprint("x = 1", src, None, "main", None).unwrap();
        assert_eq!(a, run_fingerprint("x = 1", src, None, "main", None).unwrap());
        assert_ne!(a, run_fingerprint("x = 2", src, None, "main", None).unwrap());
        assert_ne!(a, run_fingerprint("x = 1", src, None, "main", Some(3)).unwrap());
        let mut bytes = vec![7u8; 3 << 20];
        bytes[(3 << 20) - 5] = 8;
        std::fs::write(&m, bytes).unwrap();
        assert_ne!(a, run_fingerprint("x = 1", src, None, "main", None).unwrap());
    }
}

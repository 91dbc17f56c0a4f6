//! The exchange between the processes of a data-parallel run: a small trait ([`Collective`]),
//! its one-process implementation ([`SingleProcess`]) and, with the `mpi` cargo feature, MPI's
//! ([`mpi::MpiWorld`], through rsmpi).
//!
//! What data parallelism needs of it is little: every rank holds the frozen model and the
//! adapter; each computes the gradients of its share of a global batch; the ranks then **gather**
//! every share's gradients (flattened, f32) and every rank adds them in one fixed global order
//! (`crate::train`), so that N ranks reproduce one process with the same global batch bit for bit.
//! An all-gather in rank order is the one primitive that order needs (an all-reduce would sum in
//! an order MPI chooses). A GPU collective (NCCL's `ncclAllGather`) can implement the same trait.
//!
//! [`launched_world_size`] tells whether an MPI launcher (`mpirun`, `mpiexec`, Slurm's `srun`)
//! started this process, from the variables the launchers set.

#[cfg(feature = "mpi")]
pub mod mpi;

use std::cell::Cell;
use std::time::Instant;

use crate::error::{Error, Result};

/// The ranks of one run and their exchange. Every method is collective (each rank calls it in
/// the same order) unless it says otherwise; calls come from the main thread only.
pub trait Collective {
    /// This process's rank, `0..size()`. Not collective.
    fn rank(&self) -> usize;

    /// The number of ranks. Not collective.
    fn size(&self) -> usize;

    /// Every rank's `local` (lengths may differ between ranks), returned in rank order:
    /// `out[r]` is rank r's. Errors: a length over `i32::MAX` elements (MPI's count type).
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>>;

    /// [`Collective::all_gather_f32`] for f64 values (losses, metrics, token counts).
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>>;

    /// Stop every rank now with exit code `code` (MPI: `MPI_Abort` on the world). Not
    /// collective: one failing rank calls it and the launcher ends the others.
    fn abort(&self, code: i32) -> !;

    /// True on rank 0, the one that prints and writes the output folder. Not collective.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: the gathers return `local` itself; nothing is exchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(vec![local.to_vec()])
    }

    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        Ok(vec![local.to_vec()])
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The world size an MPI launcher gave this process, from its environment: Open MPI's
/// `OMPI_COMM_WORLD_SIZE`, PMIx's `PMIX_SIZE`... (Open MPI 5, Slurm `--mpi=pmix`), MPICH/Hydra's
/// and Slurm PMI's `PMI_SIZE`, or Slurm's `SLURM_NTASKS` when `SLURM_STEP_ID` says this is
/// an `srun` step. `None`: not launched by one (a plain process).
pub fn launched_world_size() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    var("OMPI_COMM_WORLD_SIZE")
        .or_else(|| var("PMIX_SIZE"))
        .or_else(|| var("PMI_SIZE"))
        .or_else(|| std::env::var_os("SLURM_STEP_ID").and(var("SLURM_NTASKS")))
}

/// The exchange of a `ropo train` process: MPI's world when an MPI launcher started it (with
/// the `mpi` feature), else one process.
///
/// Errors: launched with more than one rank by a build without the `mpi` feature (N
/// independent runs would write one output folder), or MPI failing to initialise.
pub fn from_launch() -> Result<Box<dyn Collective>> {
    #[cfg(feature = "mpi")]
    if launched_world_size().is_some() {
        return Ok(Box::new(mpi::MpiWorld::init()?));
    }
    match launched_world_size() {
        Some(n) if n > 1 => Err(Error::Msg(format!(
            "an MPI launcher started {n} ranks, but this ropo was built without MPI: rebuild with \
             `cargo build --release --features mpi` (README, \"Data parallel\"), or run one process"
        ))),
        _ => Ok(Box::new(SingleProcess)),
    }
}

/// Time spent and values moved in the exchange, for the run's report (rank 0 prints it).
#[derive(Debug, Default)]
pub struct ExchangeStats {
    seconds: Cell<f64>,
    bytes: Cell<u64>,
}

impl ExchangeStats {
    /// Run `f` (one collective call that sends `bytes` from this rank), counting its time.
    pub fn timed<T>(&self, bytes: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t0 = Instant::now();
        let out = f();
        self.seconds.set(self.seconds.get() + t0.elapsed().as_secs_f64());
        self.bytes.set(self.bytes.get() + bytes as u64);
        out
    }

    /// `(seconds, bytes sent by this rank)` so far.
    pub fn totals(&self) -> (f64, u64) {
        (self.seconds.get(), self.bytes.get())
    }
}

/// Split `n` items, taken in whole blocks of `block`, into `size` contiguous shares (the first
/// shares one block larger when the blocks do not divide evenly); rank r's share is
/// `out[r]`, a range of item indices. Every item is in exactly one share, in order.
pub fn block_shares(n: usize, block: usize, size: usize) -> Vec<std::ops::Range<usize>> {
    let block = block.max(1);
    let size = size.max(1);
    let blocks = n.div_ceil(block);
    let (per, extra) = (blocks / size, blocks % size);
    let mut out = Vec::with_capacity(size);
    let mut start_block = 0;
    for r in 0..size {
        let nb = per + usize::from(r < extra);
        let (a, b) = ((start_block * block).min(n), ((start_block + nb) * block).min(n));
        out.push(a..b);
        start_block += nb;
    }
    out
}

/// Check that every rank's `value` equals rank 0's (a config and model fingerprint).
/// Errors: name the ranks that differ, with `what`.
pub fn check_same(world: &dyn Collective, value: &[u8; 32], what: &str) -> Result<()> {
    let local: Vec<f64> = value.iter().map(|&b| b as f64).collect();
    let all = world.all_gather_f64(&local)?;
    let differ: Vec<usize> = (1..all.len()).filter(|&r| all[r] != all[0]).collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::Msg(format!(
        "rank(s) {differ:?} of {} have a different {what} than rank 0: every rank must run the same config on the same model (refused before training)",
        world.size()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_shares_cover_every_item_once_in_whole_blocks() {
        for n in 0..40 {
            for block in 1..5 {
                for size in 1..5 {
                    let s = block_shares(n, block, size);
                    assert_eq!(s.len(), size);
                    let mut next = 0;
                    for r in &s {
                        assert_eq!(r.start, next);
                        assert!(r.start % block == 0 || r.start == n, "{n} {block} {size}: {s:?}");
                        next = r.end;
                    }
                    assert_eq!(next, n);
                }
            }
        }
        assert_eq!(block_shares(10, 2, 2), vec![0..6, 6..10]);
    }

    #[test]
    fn single_process_gathers_its_own_values() {
        let w = SingleProcess;
        assert_eq!(w.all_gather_f32(&[1.0, 2.0]).unwrap(), vec![vec![1.0, 2.0]]);
        assert!(check_same(&w, &[7u8; 32], "config").is_ok());
        assert!(w.is_main());
    }
}

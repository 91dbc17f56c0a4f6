//! [`Collective`] over MPI's world communicator (rsmpi; Open MPI or MPICH), for `mpirun -np N
//! ropo train ...` and Slurm's `srun`. Built with the `mpi` cargo feature only.
//!
//! MPI is initialised with `MPI_THREAD_FUNNELED`: rayon's compute threads never call MPI, the
//! main thread makes every call. The gathers are `MPI_Allgather` of the counts, then
//! `MPI_Allgatherv` of the values, so ranks may send different lengths and every rank receives
//! them in rank order. Dropping the world finalises MPI.

use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::{Count, Threading};

use super::Collective;
use crate::error::{Error, Result};

/// MPI's world: this rank, the world's size and the universe that keeps MPI initialised.
pub struct MpiWorld {
    // field order: the communicator is dropped before the universe finalises MPI
    world: SimpleCommunicator,
    _universe: Universe,
}

impl MpiWorld {
    /// `MPI_Init_thread(FUNNELED)` and the world communicator.
    ///
    /// Errors: MPI already initialised, or the library giving less than `FUNNELED`.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::Msg("MPI was already initialised in this process".into()))?;
        if threading < Threading::Funneled {
            return Err(Error::Msg(format!("the MPI library gives thread support {threading:?}; ropo needs at least Funneled")));
        }
        let world = universe.world();
        Ok(Self { world, _universe: universe })
    }

    fn gather<T: Equivalence + Copy + Default>(&self, local: &[T]) -> Result<Vec<Vec<T>>> {
        let n = Count::try_from(local.len()).map_err(|_| Error::Msg(format!("MPI gather of {} values: over MPI's count limit", local.len())))?;
        let size = self.world.size() as usize;
        let mut counts: Vec<Count> = vec![0; size];
        self.world.all_gather_into(&n, &mut counts[..]);
        let mut displs: Vec<Count> = Vec::with_capacity(size);
        let mut total: i64 = 0;
        for &c in &counts {
            displs.push(Count::try_from(total).map_err(|_| Error::Msg("MPI gather: the ranks' values together exceed MPI's count limit".into()))?);
            total += c as i64;
        }
        let mut buf = vec![T::default(); total as usize];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(local, &mut part);
        }
        Ok(counts.iter().zip(&displs).map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec()).collect())
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.gather(local)
    }

    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        self.gather(local)
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

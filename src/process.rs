//! Process tuning that every subcommand wants before its first tensor: the compute thread
//! count, candle's element-wise pool, the allocator; and the peak memory the process used.
//!
//! `ropo`'s `main` calls [`single_threaded_elementwise`] and [`keep_freed_memory`] for every
//! subcommand; `ropo train` also [`configure_threads`] from `training.threads`; `train` (one
//! process), `eval` and `generate` run on a thread of the compute pool ([`on_compute_pool`]).
//! None of them changes a value: only where and how fast the same arithmetic runs.

/// Configure the number of compute threads (rayon's global pool, which candle's CPU kernels and
/// matmuls use) before any tensor work: `threads > 0` wins; else an existing
/// `RAYON_NUM_THREADS` is respected; else every core. Returns the count in use.
///
/// candle reads `RAYON_NUM_THREADS` itself for its matmul parallelism, so the variable is set
/// to the chosen count too. Also [`single_threaded_elementwise`] (unless `CANDLE_NUM_THREADS`
/// is set) and [`keep_freed_memory`] (the `ropo` binary has already called both, for every
/// subcommand; they are idempotent). Call it once, early, from the main thread (it sets
/// environment variables). A pool already built (a second call in one process) is left as it is.
pub fn configure_threads(threads: usize) -> usize {
    single_threaded_elementwise();
    keep_freed_memory();
    let from_env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.trim().parse::<usize>().ok()).filter(|&n| n > 0);
    let n = if threads > 0 {
        threads
    } else {
        from_env.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    rayon::current_num_threads()
}

/// Run candle's element-wise ops on the calling thread: sets `CANDLE_NUM_THREADS=1` unless the
/// variable is already set (then it is respected). Call before any tensor work (candle reads it
/// once, when it first needs its pool).
///
/// Why: candle 0.11 splits element-wise ops over 64K elements across its own "barrier pool"
/// (`CANDLE_NUM_THREADS - 1` worker threads, default: the core count), separate from the rayon
/// pool its matmuls use. Its workers and the waiting main thread busy-spin (25,000 spins)
/// between ops, so on a machine with as many cores as matmul threads they take the cores from
/// the next matmul: a profile of the training step (benches/step.rs, prefix path, 2 cores)
/// spent 56% of its samples spinning in `BarrierGuard::drop` and the pool's worker loop. The
/// matmuls keep their `RAYON_NUM_THREADS` threads. Results are bit-identical: the pool only
/// splits element-wise maps into ranges (no reduction changes order).
pub fn single_threaded_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Let the allocator keep freed activation buffers for reuse (glibc: `mallopt`; elsewhere a
/// no-op): allocations below 32 MiB come from the heap instead of fresh `mmap`s
/// (`M_MMAP_THRESHOLD`), up to 1 GiB of free heap top is kept instead of returned to the OS
/// (`M_TRIM_THRESHOLD`), the heap grows 256 MiB at a time (`M_TOP_PAD`), and every thread
/// allocates from the one main heap (`M_ARENA_MAX = 1`).
///
/// Why: a training step allocates and frees thousands of activation and gradient tensors of
/// 0.1-30 MB; with glibc's defaults many of them are fresh pages, each touched page a page
/// fault and a kernel zeroing (`clear_page`): ~8% of the step's samples in a profile
/// (benches/step.rs, prefix path). Measured there: minor page faults per 3-step run 2.2-2.5M ->
/// 0.99M, peak RSS unchanged (3.47 GiB). With a heap per thread (glibc's default arenas) the
/// compute threads' freed buffers stay in their own heaps, unusable by the main thread: one heap
/// took the anchor run's (configs/bench/anchor.toml, bf16) peak RSS from 3.15 to 2.72 GiB at
/// the same tokens/s. No effect on any value.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; any value is valid to pass.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Stack of each thread of the compute pool ([`on_compute_pool`]) of `ropo train`, `eval` and
/// `generate`, in bytes: room for candle's recursive graph walk in backward.
pub const COMPUTE_STACK_BYTES: usize = 64 << 20;

/// Run `f` on a thread of a compute pool of the configured thread count
/// (`rayon::current_num_threads()`, see [`configure_threads`]) instead of the calling thread,
/// and return its result. The serial work between the parallel ops then runs on a worker, which
/// splits each parallel op with the others and takes its own share at once, instead of a
/// thread outside the pool handing every op over and sleeping until it is done (a futex wake-up
/// each way, for each of the thousands of ops in a training step). The ops split their work by
/// the same thread count, so every value is the same. The pool's threads get `stack_size`
/// bytes of stack (candle's backward walks its graph recursively; a worker's default of 2 MiB
/// is less than the main thread's 8).
///
/// Errors: the pool cannot be built (the OS refused a thread).
pub fn on_compute_pool<R: Send>(stack_size: usize, f: impl FnOnce() -> R + Send) -> Result<R, rayon::ThreadPoolBuildError> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(rayon::current_num_threads()).stack_size(stack_size).build()?;
    Ok(pool.install(f))
}

/// The process's peak resident set size in KiB (`VmHWM` of `/proc/self/status`; Linux only).
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // 64 frames of 64 KiB each: 4 MiB of stack, twice a default thread's (the test's own and a
    // default rayon worker's); it overflows unless the pool's stack size is applied
    fn deep(depth: usize) -> u64 {
        let mut frame = [0u8; 1 << 16];
        std::hint::black_box(&mut frame);
        if depth == 0 { frame[7] as u64 + 1 } else { deep(depth - 1) + frame[depth] as u64 }
    }

    // `f` runs on a worker of a pool as large as the configured one, with the stack asked for,
    // and its result comes back; parallel ops inside it split over that pool.
    #[test]
    fn on_compute_pool_runs_on_a_worker_with_its_stack() {
        use rayon::prelude::*;
        let outside = rayon::current_num_threads();
        let (index, threads, sum, depth) = on_compute_pool(16 << 20, || {
            let sum: u64 = (0..1000u64).into_par_iter().sum();
            (rayon::current_thread_index(), rayon::current_num_threads(), sum, deep(64))
        })
        .unwrap();
        assert!(index.is_some(), "not on a pool thread");
        assert_eq!(threads, outside);
        assert_eq!(sum, 499_500);
        assert_eq!(depth, 1);
        assert!(rayon::current_thread_index().is_none(), "the caller stays outside the pool");
    }
}

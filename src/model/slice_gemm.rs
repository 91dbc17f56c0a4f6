//! Matrix products on plain slices for the fused ops' forward and backward passes, through the
//! `gemm` crate (candle's own CPU matmul kernel), so a fused op multiplies its inputs and
//! scratch buffers without building candle tensors.

use crate::model::ops::Real;

/// A strided matrix view: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// The row-major `(_, cols)` matrix in `data`.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }
    /// The transpose of the row-major `(_, cols)` matrix in `data`.
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        Self { data, rs: 1, cs: cols }
    }
}

/// `dst (m, n)`, row-major, `= keep · dst + scale · a (m, kk) · b (kk, n)`; `keep` 0 overwrites
/// (`dst` is not read). `parallel`: gemm's rayon split of the output blocks (each element's
/// sum keeps one order: deterministic); otherwise one thread.
///
/// Panics when a view or `dst` is too short for its shape (a caller's bug, never data).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: Real + 'static>(m: usize, n: usize, kk: usize, dst: &mut [T], keep: f64, scale: f64, a: View<'_, T>, b: View<'_, T>, parallel: bool) {
    let last = |v: &View<'_, T>, r: usize, c: usize| (r - 1) * v.rs + (c - 1) * v.cs;
    assert!(dst.len() >= m * n, "gemm_into: dst holds {} < {m} x {n}", dst.len());
    if m == 0 || n == 0 {
        return;
    }
    if kk == 0 {
        // nothing to add: dst = keep * dst (not read when keep is 0)
        let keep_t = T::from_f64(keep);
        dst[..m * n].iter_mut().for_each(|x| *x = if keep == 0.0 { T::zero() } else { keep_t * *x });
        return;
    }
    assert!(last(&a, m, kk) < a.data.len() && last(&b, kk, n) < b.data.len(), "gemm_into: a view is too short");
    let parallelism = if parallel && rayon::current_num_threads() > 1 { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above keep every element gemm reads (`a`, `b`, and `dst` when
    // `keep != 0`) and writes (`dst`, m contiguous rows of n) inside its slice; T is f32 or
    // f64 (Real's only implementations), which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            dst.as_mut_ptr(),
            1,
            n as isize,
            keep != 0.0,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::from_f64(keep),
            T::from_f64(scale),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `dst = a · b`, one thread ([`gemm_into`] with `keep = 0`, `scale = 1`).
pub(crate) fn matmul<T: Real + 'static>(m: usize, n: usize, kk: usize, dst: &mut [T], a: View<'_, T>, b: View<'_, T>) {
    gemm_into(m, n, kk, dst, 0.0, 1.0, a, b, false)
}

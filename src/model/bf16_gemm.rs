//! bf16 matrix products with f32 accumulation for the frozen weights (`model.dtype = "bf16"`).
//!
//! candle 0.11's CPU matmul has no bf16 kernel (it widens both operands to f32, multiplies and
//! narrows back), so a bf16 model there is slower than f32. This module multiplies an f32
//! activation matrix by a frozen bf16 weight the way PyTorch's bf16 autocast does on a CPU with
//! AVX-512 BF16: the activations are rounded to bf16 (round to nearest even), each product of two
//! bf16 values is exact in f32, and the sums are accumulated in f32 (`VDPBF16PS`, two products
//! a lane per instruction: twice the f32 FMA rate). The result is f32.
//!
//! Two products, the two a frozen linear layer needs (W of shape `(out, in)`, row-major bf16):
//! - [`Product::XWt`]: `y = x W^T`, `x (rows, in)` -> `(rows, out)` (the forward);
//! - [`Product::XW`]: `dx = dy W`, `dy (rows, out)` -> `(rows, in)` (the input gradient).
//!
//! Blocking (BLIS-style): the output is cut into tasks of [`NR`] = 32 columns x a block of rows
//! (all rows when there are enough column blocks to keep every thread busy, [`row_blocks`]), run
//! in parallel with rayon. A task takes its 32 columns of the weight in k-pair-interleaved order
//! (`panel[p][j] = (B[2p][j], B[2p+1][j])`, `K x 32` bf16): packed once per weight for the
//! forward ([`PackedWeight`]), else packed by the task into a thread-local buffer. It runs an [`MR`] x 32 microkernel
//! (16 zmm accumulators) over the whole contraction for every block of rows. Each output
//! element is computed by one task in one fixed order, so results do not depend on the thread
//! count.
//!
//! Where the CPU lacks `avx512bf16` (or `avx512f`), [`matmul`] computes the same rounded
//! operands with candle's f32 gemm ([`reference`]): the same values up to f32 summation order,
//! at f32 speed.

use std::cell::RefCell;

use half::bf16;
use rayon::prelude::*;

/// Output columns of one microkernel call / one packed weight panel.
pub const NR: usize = 32;
/// Output rows of one microkernel call.
pub const MR: usize = 8;
/// Parallel tasks per thread the row split aims for ([`row_blocks`]).
pub const TASKS_PER_THREAD: usize = 4;

/// `(row blocks, rows per block)` of an output `(rows, n)`: rows are split only as far as needed
/// for [`TASKS_PER_THREAD`] tasks per thread, since every task packs its weight panel anew;
/// blocks are a multiple of [`MR`] rows.
pub fn row_blocks(rows: usize, n: usize, threads: usize) -> (usize, usize) {
    let col_blocks = n.div_ceil(NR);
    let want = (TASKS_PER_THREAD * threads.max(1)).div_ceil(col_blocks).clamp(1, rows.div_ceil(MR).max(1));
    let per = rows.div_ceil(want).div_ceil(MR) * MR;
    (rows.div_ceil(per.max(1)).max(1), per.max(MR))
}

/// Which product of the weight `W (out, in)` to form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// `x W^T`: `x (rows, in)` -> `(rows, out)`.
    XWt,
    /// `x W`: `x (rows, out)` -> `(rows, in)`.
    XW,
}

impl Product {
    /// `(k, n)`: the contraction length and the output width for a weight of `(out, in)`.
    pub fn kn(self, out: usize, inp: usize) -> (usize, usize) {
        match self {
            Product::XWt => (inp, out),
            Product::XW => (out, inp),
        }
    }
}

/// Whether this CPU runs the AVX-512 BF16 kernel (checked once).
pub fn has_bf16_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") && std::env::var_os("ROPO_NO_BF16_KERNEL").is_none())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A frozen weight's panels for one [`Product`], packed once: `Linear::packed` holds the
/// forward's ([`Product::XWt`]; measured: ~10% of a bf16 training step went to packing before),
/// `Linear::packed_xw` the LM head's input-gradient product ([`Product::XW`], see
/// `Linear::pack_bf16`). `ceil(n / NR)` panels of `ceil(k / 2) x NR` bf16 pairs, `(k, n)` =
/// [`Product::kn`].
pub struct PackedWeight {
    product: Product,
    out: usize,
    inp: usize,
    panels: Vec<u32>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({:?}, {} x {})", self.product, self.out, self.inp)
    }
}

impl PackedWeight {
    /// Packs `w (out, in)` (row-major bf16) for [`Product::XWt`], blocks in parallel.
    pub fn new(w: &[bf16], out: usize, inp: usize) -> Self {
        Self::for_product(w, out, inp, Product::XWt)
    }

    /// Packs `w (out, in)` (row-major bf16) for `product`, blocks in parallel.
    pub fn for_product(w: &[bf16], out: usize, inp: usize, product: Product) -> Self {
        assert_eq!(w.len(), out * inp, "bf16 pack: w is not (out, in)");
        let (k, n) = product.kn(out, inp);
        let kp = k.div_ceil(2);
        let mut panels = vec![0u32; n.div_ceil(NR) * kp * NR];
        if kp > 0 {
            panels.par_chunks_mut(kp * NR).enumerate().for_each(|(cb, dst)| pack_panel(dst, w, out, inp, product, cb * NR));
        }
        Self { product, out, inp, panels }
    }

    /// `(out, in)` of the packed weight.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The product the panels serve.
    pub fn product(&self) -> Product {
        self.product
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.len() * 4
    }
}

/// `x (rows, k) · B` from packed panels: [`matmul`] with the panels' [`Product`], the same
/// values bit for bit, without packing. `w` (the same weight, row-major) serves the fallback.
pub fn matmul_packed(x: &[f32], rows: usize, w: &[bf16], packed: &PackedWeight) -> Vec<f32> {
    let (out, inp) = packed.dims();
    dispatch(x, rows, w, out, inp, packed.product, Some(&packed.panels))
}

/// `x (rows, k) · B` with `B (k, n)` taken from the row-major bf16 weight `w (out, in)` as
/// `product` says; returns the `(rows, n)` f32 result, row-major.
///
/// `x` is rounded to bf16 (nearest even) first; products exact, sums in f32. With the AVX-512
/// BF16 kernel denormal inputs and outputs of the dot-product instruction are flushed to zero
/// (as the instruction defines); the fallback keeps them. Panics if the slice lengths do not
/// match the dimensions (the callers check shapes and report errors before).
pub fn matmul(x: &[f32], rows: usize, w: &[bf16], out: usize, inp: usize, product: Product) -> Vec<f32> {
    dispatch(x, rows, w, out, inp, product, None)
}

/// [`matmul`] on the kernel when the CPU has it (with `product`'s `packed` panels when given),
/// else [`reference`].
fn dispatch(x: &[f32], rows: usize, w: &[bf16], out: usize, inp: usize, product: Product, packed: Option<&[u32]>) -> Vec<f32> {
    let (k, n) = product.kn(out, inp);
    assert_eq!(x.len(), rows * k, "bf16 matmul: x is not (rows, k)");
    assert_eq!(w.len(), out * inp, "bf16 matmul: w is not (out, in)");
    if rows == 0 || n == 0 {
        return vec![0.0; rows * n];
    }
    #[cfg(target_arch = "x86_64")]
    if has_bf16_kernel() {
        // SAFETY: the CPU has avx512f + avx512bf16 (checked above).
        return unsafe { avx512::run(x, rows, w, out, inp, product, packed) };
    }
    reference(x, rows, w, out, inp, product)
}

/// The portable definition of [`matmul`]: round `x` to bf16, widen both operands to f32 and
/// multiply with an f32 gemm (candle's). The kernel's test oracle and the fallback.
pub fn reference(x: &[f32], rows: usize, w: &[bf16], out: usize, inp: usize, product: Product) -> Vec<f32> {
    use candle_core::{Device, Tensor};
    let (k, n) = product.kn(out, inp);
    let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let run = || -> candle_core::Result<Vec<f32>> {
        let xt = Tensor::from_vec(xr, (rows, k), &Device::Cpu)?;
        let wt = Tensor::from_vec(wf, (out, inp), &Device::Cpu)?;
        let b = match product {
            Product::XWt => wt.t()?,
            Product::XW => wt,
        };
        xt.matmul(&b)?.flatten_all()?.to_vec1::<f32>()
    };
    let y = run().expect("f32 matmul of checked shapes");
    debug_assert_eq!(y.len(), rows * n);
    y
}

/// A raw output pointer shared by the parallel tasks; each task writes a disjoint block.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row block, column block) regions of one buffer that outlives
// the parallel loop (see `avx512::matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

thread_local! {
    /// One task's packed weight panel, `K/2 x NR` u32 (bf16 pairs); reused across calls.
    static PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `x` rounded to bf16, row-major, each row padded to an even length `kp2 = 2 * ceil(k/2)`
/// and read as u32 pairs `(x[r][2p], x[r][2p+1])` (low half first).
// the scalar definition: the AVX-512 kernel's path runs `avx512::round_rows_avx512` (tested to
// give these bits)
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
fn round_rows(x: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    // every element is written below: no zero fill first (a pass over the buffer)
    let mut out: Vec<u32> = Vec::with_capacity(rows * kp);
    out.spare_capacity_mut()[..rows * kp].par_chunks_mut(kp).zip(x.par_chunks(k)).for_each(|(o, xr)| {
        for (p, o) in o.iter_mut().enumerate() {
            let lo = bf16::from_f32(xr[2 * p]).to_bits() as u32;
            let hi = if 2 * p + 1 < k { bf16::from_f32(xr[2 * p + 1]).to_bits() as u32 } else { 0 };
            o.write(lo | (hi << 16));
        }
    });
    // SAFETY: the loop above wrote all `rows * kp` elements (x holds `rows` rows of `k`, each
    // giving one chunk of `kp`; callers assert the length).
    unsafe { out.set_len(rows * kp) };
    out
}

/// Packs the columns `n0 .. n0 + NR` of `B (k, n)` (zero beyond `n`) into `panel[p * NR + j] =
/// (B[2p][n0 + j], B[2p + 1][n0 + j])` (`panel`: `ceil(k/2) * NR` entries), `B` read from
/// `w (out, in)` as `product` says.
fn pack_panel(panel: &mut [u32], w: &[bf16], out: usize, inp: usize, product: Product, n0: usize) {
    let (k, n) = product.kn(out, inp);
    let kp = k.div_ceil(2);
    debug_assert_eq!(panel.len(), kp * NR);
    panel.fill(0);
    let bits = |v: bf16| v.to_bits() as u32;
    let cols = NR.min(n - n0);
    match product {
        // B[kk][j] = W[j][kk]: column j of B is row j of W, pairs contiguous in it.
        Product::XWt => {
            for j in 0..cols {
                let row = &w[(n0 + j) * inp..(n0 + j + 1) * inp];
                for p in 0..kp {
                    let lo = bits(row[2 * p]);
                    let hi = if 2 * p + 1 < k { bits(row[2 * p + 1]) } else { 0 };
                    panel[p * NR + j] = lo | (hi << 16);
                }
            }
        }
        // B[kk][j] = W[kk][j]: a pair interleaves two rows of W.
        Product::XW => {
            for p in 0..kp {
                let r0 = &w[(2 * p) * inp + n0..(2 * p) * inp + n0 + cols];
                let dst = &mut panel[p * NR..p * NR + cols];
                if 2 * p + 1 < k {
                    let r1 = &w[(2 * p + 1) * inp + n0..(2 * p + 1) * inp + n0 + cols];
                    for j in 0..cols {
                        dst[j] = bits(r0[j]) | (bits(r1[j]) << 16);
                    }
                } else {
                    for j in 0..cols {
                        dst[j] = bits(r0[j]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{bf16, pack_panel, row_blocks, OutPtr, Product, MR, NR, PANEL};
    use rayon::prelude::*;
    use std::arch::x86_64::{
        __m256i, __m512bh, __m512i, __mmask16, _mm256_storeu_si256, _mm512_add_epi32, _mm512_and_si512, _mm512_cmpgt_epu32_mask,
        _mm512_cvtepi32_epi16, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_mask_mov_epi32, _mm512_mask_storeu_ps, _mm512_or_si512,
        _mm512_set1_epi32, _mm512_setzero_ps, _mm512_srli_epi32, _mm512_storeu_ps,
    };
    use std::mem::MaybeUninit;

    /// [`super::round_rows`] with AVX-512F integer ops, 16 values at a time: the same bits
    /// (half's `bf16::from_f32`: round to nearest even on the bit pattern, `(x + 0x7fff +
    /// lsb) >> 16`; a NaN keeps its sign and top mantissa bits and is made quiet, `| 0x40`),
    /// denormals included (unlike `VCVTNE2PS2BF16`, which flushes them). The scalar loop did
    /// 6-7% of a bf16 training step's samples (`perf`, 2026-12-04).
    ///
    /// # Safety
    /// The CPU must support `avx512f`.
    pub unsafe fn round_rows_avx512(x: &[f32], rows: usize, k: usize) -> Vec<u32> {
        let kp = k.div_ceil(2);
        assert!(x.len() >= rows * k, "round_rows: x holds {} < {rows} x {k}", x.len());
        let mut out: Vec<u32> = Vec::with_capacity(rows * kp);
        out.spare_capacity_mut()[..rows * kp].par_chunks_mut(kp).zip(x.par_chunks(k)).for_each(|(o, xr)| {
            // SAFETY: the caller guarantees avx512f; `round_row` writes all of `o`.
            unsafe { round_row(xr, o) }
        });
        // SAFETY: every chunk of `kp` was written by `round_row` (x holds `rows` rows of `k`).
        unsafe { out.set_len(rows * kp) };
        out
    }

    /// One row `xr (k,)` into `o (ceil(k/2),)` bf16 pairs (low half first), every entry written.
    #[target_feature(enable = "avx512f")]
    unsafe fn round_row(xr: &[f32], o: &mut [MaybeUninit<u32>]) {
        let k = xr.len();
        let full = k / 16;
        let (abs, inf, half, one, quiet) =
            (_mm512_set1_epi32(0x7fff_ffff), _mm512_set1_epi32(0x7f80_0000), _mm512_set1_epi32(0x7fff), _mm512_set1_epi32(1), _mm512_set1_epi32(0x40));
        for i in 0..full {
            // SAFETY: 16 f32 from 16 i on are inside `xr`; 8 u32 from 8 i on inside `o` (k/2 >= 8 i + 8).
            let v: __m512i = _mm512_loadu_si512(xr.as_ptr().add(16 * i) as *const _);
            let hi = _mm512_srli_epi32::<16>(v);
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(v, half), _mm512_and_si512(hi, one)));
            let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(v, abs), inf);
            let r = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, quiet));
            // each lane's low 16 bits, in order: lanes 2p, 2p+1 become the pair p
            let pairs: __m256i = _mm512_cvtepi32_epi16(r);
            _mm256_storeu_si256(o.as_mut_ptr().add(8 * i) as *mut __m256i, pairs);
        }
        for p in 8 * full..o.len() {
            let lo = bf16::from_f32(xr[2 * p]).to_bits() as u32;
            let hi = if 2 * p + 1 < k { bf16::from_f32(xr[2 * p + 1]).to_bits() as u32 } else { 0 };
            o[p].write(lo | (hi << 16));
        }
    }

    /// [`super::matmul`] on the AVX-512 BF16 kernel; `packed`: `product`'s panels of `w` when
    /// packed already.
    ///
    /// # Safety
    /// The CPU must support `avx512f` and `avx512bf16`.
    pub unsafe fn run(x: &[f32], rows: usize, w: &[bf16], out: usize, inp: usize, product: Product, packed: Option<&[u32]>) -> Vec<f32> {
        let (k, n) = product.kn(out, inp);
        let kp = k.div_ceil(2);
        let a = round_rows_avx512(x, rows, k);
        // every element is written by exactly one task below (the (row block, column block)
        // tasks tile the output; the last column block's masked store writes its `cols`): no
        // zero fill first
        let mut y: Vec<f32> = Vec::with_capacity(rows * n);
        let col_blocks = n.div_ceil(NR);
        let (row_blocks, per) = row_blocks(rows, n, rayon::current_num_threads());
        let ptr = OutPtr(y.as_mut_ptr());
        (0..col_blocks * row_blocks).into_par_iter().for_each(|t| {
            let (cb, rb) = (t / row_blocks, t % row_blocks);
            let n0 = cb * NR;
            let cols = NR.min(n - n0);
            let (r0, r1) = (rb * per, (rb * per + per).min(rows));
            PANEL.with(|own| {
                let mut own = own.borrow_mut();
                let panel: &[u32] = match packed {
                    Some(p) => &p[cb * kp * NR..(cb + 1) * kp * NR],
                    None => {
                        own.resize(kp * NR, 0);
                        pack_panel(&mut own, w, out, inp, product, n0);
                        &own
                    }
                };
                let ptr = ptr;
                let mut r = r0;
                while r < r1 {
                    let m = MR.min(r1 - r);
                    // SAFETY: rows r..r+m and columns n0..n0+cols of y belong to this task only;
                    // `a` holds rows x kp pairs, the panel kp x NR.
                    unsafe {
                        let ap = a.as_ptr().add(r * kp);
                        let cp = ptr.0.add(r * n + n0);
                        match m {
                            8 => kernel::<8>(ap, kp, panel.as_ptr(), cp, n, cols),
                            7 => kernel::<7>(ap, kp, panel.as_ptr(), cp, n, cols),
                            6 => kernel::<6>(ap, kp, panel.as_ptr(), cp, n, cols),
                            5 => kernel::<5>(ap, kp, panel.as_ptr(), cp, n, cols),
                            4 => kernel::<4>(ap, kp, panel.as_ptr(), cp, n, cols),
                            3 => kernel::<3>(ap, kp, panel.as_ptr(), cp, n, cols),
                            2 => kernel::<2>(ap, kp, panel.as_ptr(), cp, n, cols),
                            _ => kernel::<1>(ap, kp, panel.as_ptr(), cp, n, cols),
                        }
                    }
                    r += m;
                }
            });
        });
        // SAFETY: the tasks above wrote all rows x n elements (see the allocation).
        unsafe { y.set_len(rows * n) };
        y
    }

    /// `C[R x cols] = A[R x 2kp] · panel`, A as u32 bf16 pairs with row stride `kp`, the panel
    /// `kp x NR` pairs, C with row stride `ldc`. 2R zmm accumulators.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize>(a: *const u32, kp: usize, panel: *const u32, c: *mut f32, ldc: usize, cols: usize) {
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16) as *const _));
            for r in 0..R {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
                acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
            }
        }
        if cols == NR {
            for r in 0..R {
                _mm512_storeu_ps(c.add(r * ldc), acc0[r]);
                _mm512_storeu_ps(c.add(r * ldc + 16), acc1[r]);
            }
        } else {
            let m0: __mmask16 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as u16 };
            let m1: __mmask16 = if cols <= 16 { 0 } else { ((1u32 << (cols - 16)) - 1) as u16 };
            for r in 0..R {
                _mm512_mask_storeu_ps(c.add(r * ldc), m0, acc0[r]);
                _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, acc1[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect()
    }

    // Kernel vs the rounded-operand f32 product, every tail: rows not a multiple of MR or of a
    // task, columns not a multiple of NR (masked stores), odd k (zero-padded pair), both
    // products. Error bound: f32 summation-order rounding, k * 2^-24 * sum |a||b|.
    #[test]
    fn kernel_matches_rounded_f32_product() {
        for &(rows, out, inp) in &[(1, 32, 16), (7, 5, 3), (9, 33, 17), (130, 70, 64), (300, 48, 96), (17, 1, 1)] {
            for product in [Product::XWt, Product::XW] {
                let (k, n) = product.kn(out, inp);
                let x = data(rows * k, 1);
                let w: Vec<bf16> = data(out * inp, 2).into_iter().map(bf16::from_f32).collect();
                let got = matmul(&x, rows, &w, out, inp, product);
                let want = reference(&x, rows, &w, out, inp, product);
                let wabs: Vec<f32> = w.iter().map(|v| v.to_f32().abs()).collect();
                let xabs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                let bound = reference(&xabs, rows, &wabs.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), out, inp, product);
                assert_eq!(got.len(), rows * n);
                for i in 0..got.len() {
                    let tol = (k as f32) * 2f32.powi(-23) * bound[i] + 1e-30;
                    assert!((got[i] - want[i]).abs() <= tol, "{product:?} ({rows},{out},{inp}) [{i}]: {} vs {} (tol {tol})", got[i], want[i]);
                }
            }
        }
    }

    // The kernel rounds x to nearest even bf16: an x that is exactly representable gives the
    // exact product of small integers (no rounding anywhere), a half-way x rounds to even.
    #[test]
    fn exact_on_representable_values_and_rounds_x_to_nearest_even() {
        let (rows, out, inp) = (3, 40, 6);
        let x: Vec<f32> = (0..rows * inp).map(|i| (i % 7) as f32 - 3.0).collect();
        let w: Vec<bf16> = (0..out * inp).map(|i| bf16::from_f32((i % 5) as f32 - 2.0)).collect();
        let got = matmul(&x, rows, &w, out, inp, Product::XWt);
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i].to_f32()).sum();
                assert_eq!(got[r * out + o], want);
            }
        }
        // 1 + 2^-8 is half-way between bf16 1 and 1 + 2^-7: rounds to even (1.0).
        let one = [bf16::from_f32(1.0); 2];
        let y = matmul(&[1.0 + 2f32.powi(-8), 0.0], 1, &one, 1, 2, Product::XWt);
        assert_eq!(y, vec![1.0]);
    }

    // Results do not depend on the thread count (each element has one task, one order).
    #[test]
    fn thread_count_independent() {
        let (rows, out, inp) = (260, 96, 80);
        let x = data(rows * out.max(inp), 3);
        let w: Vec<bf16> = data(out * inp, 4).into_iter().map(bf16::from_f32).collect();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for product in [Product::XWt, Product::XW] {
            let (k, _) = product.kn(out, inp);
            let x = &x[..rows * k];
            let a = one.install(|| matmul(x, rows, &w, out, inp, product));
            let b = three.install(|| matmul(x, rows, &w, out, inp, product));
            assert_eq!(a, b);
        }
    }

    // Packed once or per call: the same values, bit for bit (tails included).
    #[test]
    fn packed_weights_give_the_same_values() {
        for &(rows, out, inp) in &[(9, 33, 17), (130, 70, 64), (1, 5, 3)] {
            let x = data(rows * inp, 5);
            let w: Vec<bf16> = data(out * inp, 6).into_iter().map(bf16::from_f32).collect();
            let p = PackedWeight::new(&w, out, inp);
            assert_eq!(p.dims(), (out, inp));
            assert_eq!(matmul_packed(&x, rows, &w, &p), matmul(&x, rows, &w, out, inp, Product::XWt));
            // the input-gradient product's panels: x (rows, out) W
            let dy = data(rows * out, 7);
            let pxw = PackedWeight::for_product(&w, out, inp, Product::XW);
            assert_eq!(pxw.product(), Product::XW);
            assert_eq!(matmul_packed(&dy, rows, &w, &pxw), matmul(&dy, rows, &w, out, inp, Product::XW));
        }
    }

    // Row blocks cover the rows exactly once, in MR multiples, and give every thread work.
    #[test]
    fn row_blocks_cover_the_rows() {
        for &(rows, n, threads) in &[(940, 576, 2), (940, 192, 2), (1, 32, 16), (500, 49152, 2), (37, 32, 8), (8, 16, 3)] {
            let (blocks, per) = row_blocks(rows, n, threads);
            assert_eq!(per % MR, 0);
            assert!(blocks * per >= rows && (blocks - 1) * per < rows, "({rows}, {n}, {threads}): {blocks} x {per}");
            assert!(blocks * n.div_ceil(NR) >= threads.min(rows.div_ceil(MR) * n.div_ceil(NR)));
        }
    }

    // The AVX-512 rounding gives the scalar rounding's bits: random values, every tail length,
    // half-way cases (both parities), denormals, infinities, signed zeros, NaNs (quiet and
    // signalling, both signs), the largest finite values (which round to infinity).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_rounding_equals_scalar_rounding() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let special: Vec<f32> = [
            0x0000_0000u32, 0x8000_0000, 0x0000_0001, 0x8000_8000, 0x0000_8000, 0x0001_8000, 0x0001_7fff, 0x0001_8001, 0x007f_ffff,
            0x3f80_8000, 0x3f81_8000, 0x3f80_7fff, 0x7f7f_ffff, 0xff7f_ffff, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0xffc0_0000,
            0x7f80_0001, 0xff80_0001, 0x7fbf_ffff, 0x7fff_ffff, 0xffff_ffff,
        ]
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
        for k in [1, 2, 15, 16, 17, 31, 32, 33, 576, 1537] {
            let mut x = data(3 * k, k as u64);
            for (i, v) in x.iter_mut().enumerate().step_by(3) {
                *v = special[i % special.len()];
            }
            // SAFETY: avx512f checked above.
            let got = unsafe { avx512::round_rows_avx512(&x, 3, k) };
            assert_eq!(got, round_rows(&x, 3, k), "k = {k}");
        }
    }

    #[test]
    fn empty_inputs() {
        let w = vec![bf16::from_f32(1.0); 6];
        assert!(matmul(&[], 0, &w, 2, 3, Product::XWt).is_empty());
    }
}

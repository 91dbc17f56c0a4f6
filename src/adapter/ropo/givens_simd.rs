//! The Givens stages' two row loops in f32 with AVX-512F, eight pairs a time: the rotation of a
//! stage's pairs ([`rotate_row`]) and the angle-gradient sum of the backward ([`add_dtheta`]).
//!
//! Same arithmetic as the scalar loops of [`super::givens`], operation for operation (a product
//! and a sum of products, never fused; the gradient term formed in f32, widened exactly and summed
//! in f64 in the same order per angle), so the results are the same bits; tested against them
//! below. The scalar loops were 5-6% of a bf16 training step's samples (`perf`, 2026-12-04):
//! the interleaved pairs and bounds checks kept them scalar.
//!
//! Layout: pair `k` of a stage is `(row[off + 2k], row[off + 2k + 1])`; one zmm holds eight
//! pairs, `[a0, b0, a1, b1, ...]`; `swap` exchanges each pair's halves.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m512, _mm256_castsi256_ps, _mm256_loadu_ps, _mm512_add_pd, _mm512_add_ps, _mm512_castps256_ps512, _mm512_castps_si512, _mm512_cvtepi64_epi32,
    _mm512_cvtps_pd, _mm512_loadu_pd, _mm512_loadu_ps, _mm512_mul_ps, _mm512_permute_ps, _mm512_permutexvar_ps,
    _mm512_set_epi32, _mm512_setr_ps, _mm512_storeu_pd, _mm512_storeu_ps, _mm512_sub_ps,
};

/// Whether the AVX-512F loops can run (the model's one check, made once).
#[cfg(target_arch = "x86_64")]
fn available() -> bool {
    crate::model::reduce::avx512()
}

/// `[a0, b0, a1, b1, ...] -> [b0, a0, b1, a1, ...]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn swap(v: __m512) -> __m512 {
    _mm512_permute_ps::<0b1011_0001>(v)
}

/// `[c0, c0, c1, c1, ..., c7, c7]` from eight values at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn doubled(p: *const f32) -> __m512 {
    let idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(p)))
}

/// `G_s^T` (`sign = 1`) or `G_s` (`sign = -1`) on the pairs of one stage of `row`, in place:
/// `row[p] = c a + (s sign) b`, `row[p + 1] = c b - (s sign) a` for pair `k` at `p = off + 2k`,
/// `(a, b)` its old values, `c, s = cos[k], sin[k]`.
///
/// Panics when `row` is shorter than `off + 2 cos.len()` or `sin` shorter than `cos`.
pub(crate) fn rotate_row(row: &mut [f32], cos: &[f32], sin: &[f32], off: usize, sign: f32) {
    let len = cos.len();
    assert!(sin.len() >= len && row.len() >= off + 2 * len, "givens rotate_row: slices too short");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: avx512f checked; the assert above keeps every access inside the slices.
        unsafe { rotate_row_avx512(row, cos, sin, off, sign) };
        return;
    }
    rotate_pairs(row, cos, sin, off, sign, 0);
}

/// The scalar loop from pair `from` on.
#[inline(always)]
fn rotate_pairs(row: &mut [f32], cos: &[f32], sin: &[f32], off: usize, sign: f32, from: usize) {
    for k in from..cos.len() {
        let p = off + 2 * k;
        let (a, b) = (row[p], row[p + 1]);
        let (c, s) = (cos[k], sin[k] * sign);
        row[p] = c * a + s * b;
        row[p + 1] = c * b - s * a;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rotate_row_avx512(row: &mut [f32], cos: &[f32], sin: &[f32], off: usize, sign: f32) {
    let full = cos.len() / 8;
    // even lanes s * sign, odd lanes s * -sign = -(s * sign): exact for sign = ±1
    let signs = _mm512_setr_ps(sign, -sign, sign, -sign, sign, -sign, sign, -sign, sign, -sign, sign, -sign, sign, -sign, sign, -sign);
    let base = row.as_mut_ptr().add(off);
    for j in 0..full {
        let v = _mm512_loadu_ps(base.add(16 * j));
        let c = doubled(cos.as_ptr().add(8 * j));
        let s = _mm512_mul_ps(doubled(sin.as_ptr().add(8 * j)), signs);
        // even: c a + s' b; odd: c b + (-s') a, which is c b - s' a exactly
        let y = _mm512_add_ps(_mm512_mul_ps(c, v), _mm512_mul_ps(s, swap(v)));
        _mm512_storeu_ps(base.add(16 * j), y);
    }
    rotate_pairs(row, cos, sin, off, sign, 8 * full);
}

/// The backward's angle-gradient terms of one stage: `acc[k] += f64(g[p] z[p + 1] - g[p + 1]
/// z[p])` for pair `k` at `p = off + 2k`, `k < acc.len()`; `g` the incoming gradient, `z` the
/// stage's output (the products and their difference in f32, as the scalar loop).
///
/// Panics when `g` or `z` is shorter than `off + 2 acc.len()`.
pub(crate) fn add_dtheta(acc: &mut [f64], g: &[f32], z: &[f32], off: usize) {
    let len = acc.len();
    assert!(g.len() >= off + 2 * len && z.len() >= off + 2 * len, "givens add_dtheta: slices too short");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: avx512f checked; the assert above keeps every access inside the slices.
        unsafe { add_dtheta_avx512(acc, g, z, off) };
        return;
    }
    add_terms(acc, g, z, off, 0);
}

#[inline(always)]
fn add_terms(acc: &mut [f64], g: &[f32], z: &[f32], off: usize, from: usize) {
    for k in from..acc.len() {
        let p = off + 2 * k;
        acc[k] += (g[p] * z[p + 1] - g[p + 1] * z[p]) as f64;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_dtheta_avx512(acc: &mut [f64], g: &[f32], z: &[f32], off: usize) {
    let full = acc.len() / 8;
    let (gp, zp, ap) = (g.as_ptr().add(off), z.as_ptr().add(off), acc.as_mut_ptr());
    for j in 0..full {
        // even lanes g_p z_{p+1}, odd lanes g_{p+1} z_p
        let prod = _mm512_mul_ps(_mm512_loadu_ps(gp.add(16 * j)), swap(_mm512_loadu_ps(zp.add(16 * j))));
        // even lanes: g_p z_{p+1} - g_{p+1} z_p; then the even lanes alone (each 64-bit lane's low half)
        let diff = _mm512_sub_ps(prod, swap(prod));
        let terms = _mm256_castsi256_ps(_mm512_cvtepi64_epi32(_mm512_castps_si512(diff)));
        let sum = _mm512_add_pd(_mm512_loadu_pd(ap.add(8 * j)), _mm512_cvtps_pd(terms));
        _mm512_storeu_pd(ap.add(8 * j), sum);
    }
    add_terms(acc, g, z, off, 8 * full);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect()
    }

    // The vector loops give the scalar loops' bits for every tail length, both offsets and signs.
    #[test]
    fn vector_loops_equal_the_scalar_loops() {
        for len in [0, 1, 7, 8, 9, 16, 23, 287, 288] {
            for off in [0, 1] {
                let (cos, sin) = (data(len, 1), data(len, 2));
                for sign in [1.0f32, -1.0] {
                    let mut got = data(off + 2 * len + 1, 3);
                    let mut want = got.clone();
                    rotate_row(&mut got, &cos, &sin, off, sign);
                    rotate_pairs(&mut want, &cos, &sin, off, sign, 0);
                    assert_eq!(got, want, "rotate len {len} off {off} sign {sign}");
                }
                let (g, z) = (data(off + 2 * len, 4), data(off + 2 * len, 5));
                let mut got: Vec<f64> = data(len, 6).into_iter().map(f64::from).collect();
                let mut want = got.clone();
                add_dtheta(&mut got, &g, &z, off);
                add_terms(&mut want, &g, &z, off, 0);
                assert_eq!(got, want, "dtheta len {len} off {off}");
            }
        }
    }
}

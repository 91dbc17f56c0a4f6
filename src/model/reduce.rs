//! Row reductions (max, sum, dot) in a fixed order of 16 interleaved partial sums, so the
//! compiler vectorises them: element `i` goes to lane `i % 16`, whole groups of 16 first, the
//! lanes then combined pairwise (`l + l+8`, `+4`, `+2`, `+1`), the tail `len % 16` added last in
//! order. The order depends only on the length: the same bits every run, thread count and
//! machine with the same instructions (no fused multiply-add is ever formed), and for the
//! AVX-512 and the baseline builds of the same loop ([`crate::model::vexp`]'s scheme: one
//! `#[inline(always)]` body, compiled a second time inside an `avx512f` function chosen at run
//! time).
//!
//! Why: a sequential `sum = sum + x` is one dependent add per element (the latency of an add,
//! ~3-4 cycles, per element); the softmax of the fused attention (256 keys a row, ~550,000 rows
//! a training step, forward and recomputed in the backward), RMSNorm's sum of squares and the LM
//! head's log-sum-exp over 49,152 logits spent most of their time there (`perf`, 2026-12-04:
//! softmax 4.7% of a bf16 step's samples, more than the score product before it). The values
//! differ from a sequential sum by rounding only (the same terms summed in another order).
//!
//! The order depends on the length, so zeros appended to a row can change a sum's or a dot's
//! last bits (they move which elements form the tail): a reduction over a row's open keys and
//! one over the same keys plus masked trailing ones agree to rounding, not bit for bit. The
//! softmax's sum needs bit-exact agreement across layouts, and has its own sum ([`sum_unit`]).

use std::ops::{Add, Mul};

/// Partial sums per reduction.
pub const LANES: usize = 16;

/// Whether the CPU has AVX-512F (checked once): the reductions' and
/// [`crate::model::ops`]' row loops then run their AVX-512 builds.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// Runs `$body` (an expression over the function's arguments) compiled for AVX-512F when the
/// CPU has it, else for the baseline; both are the same operations.
macro_rules! dispatch {
    ($avx:ident, $portable:ident, ($($a:ident),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if avx512() {
                // SAFETY: the CPU supports AVX-512F (checked at run time just above).
                return unsafe { $avx($($a),*) };
            }
        }
        $portable($($a),*)
    }};
}

/// The lanes combined pairwise, then `tail` added in order.
#[inline(always)]
fn combine<T: Copy + Add<Output = T>>(mut acc: [T; LANES], tail: impl Iterator<Item = T>) -> T {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] = acc[i] + acc[i + w];
        }
        w /= 2;
    }
    tail.fold(acc[0], |s, x| s + x)
}

/// `sum_i v[i]` (module order); `zero` for an empty slice.
pub fn sum<T: Copy + Add<Output = T>>(v: &[T], zero: T) -> T {
    dispatch!(sum_avx512, sum_portable, (v, zero))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512<T: Copy + Add<Output = T>>(v: &[T], zero: T) -> T {
    sum_portable(v, zero)
}

#[inline(always)]
fn sum_portable<T: Copy + Add<Output = T>>(v: &[T], zero: T) -> T {
    let mut acc = [zero; LANES];
    let groups = v.chunks_exact(LANES);
    let tail = groups.remainder();
    for g in groups {
        for i in 0..LANES {
            acc[i] = acc[i] + g[i];
        }
    }
    combine(acc, tail.iter().copied())
}

/// `sum_i a[i] b[i]` over the shorter length (module order; each product rounded, then added).
pub fn dot<T: Copy + Add<Output = T> + Mul<Output = T>>(a: &[T], b: &[T], zero: T) -> T {
    dispatch!(dot_avx512, dot_portable, (a, b, zero))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512<T: Copy + Add<Output = T> + Mul<Output = T>>(a: &[T], b: &[T], zero: T) -> T {
    dot_portable(a, b, zero)
}

#[inline(always)]
fn dot_portable<T: Copy + Add<Output = T> + Mul<Output = T>>(a: &[T], b: &[T], zero: T) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [zero; LANES];
    let (ga, gb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ga.remainder(), gb.remainder());
    for (x, y) in ga.zip(gb) {
        for i in 0..LANES {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    combine(acc, ta.iter().zip(tb).map(|(&x, &y)| x * y))
}

/// The largest element of a non-empty `v` by `>` comparisons: the value a sequential `if x > m
/// { m = x }` from `m = v[0]` gives, up to the sign of a zero (`-0.0` and `0.0` compare equal,
/// so which one a row of both returns depends on the lanes); a NaN after `v[0]` is never
/// chosen.
///
/// Panics on an empty slice.
pub fn max<T: Copy + PartialOrd>(v: &[T]) -> T {
    assert!(!v.is_empty(), "reduce::max of an empty slice");
    dispatch!(max_avx512, max_portable, (v))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_avx512<T: Copy + PartialOrd>(v: &[T]) -> T {
    max_portable(v)
}

#[inline(always)]
fn max_portable<T: Copy + PartialOrd>(v: &[T]) -> T {
    let pick = |m: T, x: T| if x > m { x } else { m };
    let mut acc = [v[0]; LANES];
    let groups = v.chunks_exact(LANES);
    let tail = groups.remainder();
    for g in groups {
        for i in 0..LANES {
            acc[i] = pick(acc[i], g[i]);
        }
    }
    let mut m = acc.into_iter().fold(v[0], pick);
    for &x in tail {
        m = pick(m, x);
    }
    m
}

/// `sum_i f(v[i])` accumulated in f64 (module order); e.g. a sum of squares of f32 values.
pub fn sum_f64<T: Copy>(v: &[T], f: impl Fn(T) -> f64 + Copy) -> f64 {
    dispatch!(sum_f64_avx512, sum_f64_portable, (v, f))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_f64_avx512<T: Copy>(v: &[T], f: impl Fn(T) -> f64 + Copy) -> f64 {
    sum_f64_portable(v, f)
}

#[inline(always)]
fn sum_f64_portable<T: Copy>(v: &[T], f: impl Fn(T) -> f64 + Copy) -> f64 {
    let mut acc = [0f64; LANES];
    let groups = v.chunks_exact(LANES);
    let tail = groups.remainder();
    for g in groups {
        for i in 0..LANES {
            acc[i] += f(g[i]);
        }
    }
    combine(acc, tail.iter().map(|&x| f(x)))
}

/// `sum_i f(a[i], b[i], c[i])` accumulated in f64 over the shortest length (module order).
pub fn sum3_f64<T: Copy>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> f64 + Copy) -> f64 {
    dispatch!(sum3_f64_avx512, sum3_f64_portable, (a, b, c, f))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum3_f64_avx512<T: Copy>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> f64 + Copy) -> f64 {
    sum3_f64_portable(a, b, c, f)
}

#[inline(always)]
fn sum3_f64_portable<T: Copy>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> f64 + Copy) -> f64 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f64; LANES];
    let full = n / LANES * LANES;
    for ((x, y), z) in a[..full].chunks_exact(LANES).zip(b[..full].chunks_exact(LANES)).zip(c[..full].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i], z[i]);
        }
    }
    combine(acc, (full..n).map(|i| f(a[i], b[i], c[i])))
}

/// Fixed-point scale of [`sum_unit`]: each value is counted in units of `2^-40`.
const UNIT_SCALE: f32 = (1u64 << 40) as f32;

/// The most units one value counts for, `2^64 - 2^40` (the largest f32 below `2^64`).
const MAX_UNITS: f32 = ((u64::MAX >> 40) << 40) as f32;

/// `sum_i v[i]` of values in `[0, 1]` (a softmax row's `exp(x - max)`), exactly associative:
/// each value is truncated to a multiple of `2^-40` and the multiples are summed as integers,
/// then rounded once to f32. So the result does not depend on the order of the terms, nor on
/// exact zeros inserted among them. The shared-prompt layout ([`crate::model::prefix`]) gives a
/// completion's query row the keys `[prompt (Tp, padded) ; completion]`, so the prompt's padding
/// `lp_b..Tp` sits masked between its open keys, where the concatenated layout has no masked key
/// before the row's last open one (a sliding window masks a row's first keys in both); a float
/// sum in lanes would round those rows differently, this one gives the same bits (the identity
/// at init, loss `ln 2`, rests on it in bf16, tests/bf16.rs). Error: under `n 2^-40` absolute
/// (`n` terms), so under `n 2^-40` relative when the row holds its max's `exp(0) = 1`: ~2e-10
/// for 256 keys, ~0.002-0.004 of an f32 ulp of the sum, well below a sequential f32 sum's
/// rounding.
///
/// Values outside `[0, 1]`: a value in `(1, 2^24)` is counted as well (its units fit a u64);
/// larger values and infinity count as `2^64 - 2^40` units, and the u64 total wraps once the
/// sum passes `2^24`; negatives and NaN count as 0.
pub fn sum_unit(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512dq() {
            // SAFETY: the CPU supports AVX-512F and DQ (checked at run time just above).
            return unsafe { sum_unit_avx512(v) };
        }
    }
    sum_unit_portable(v)
}

/// Whether the CPU has AVX-512F and DQ (packed f32 -> u64 conversions), checked once.
#[cfg(target_arch = "x86_64")]
fn avx512dq() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| avx512() && is_x86_feature_detected!("avx512dq"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn sum_unit_avx512(v: &[f32]) -> f32 {
    sum_unit_portable(v)
}

#[inline(always)]
fn sum_unit_portable(v: &[f32]) -> f32 {
    // clamped so the plain conversion is defined, and vectorises (`vcvttps2uqq` in the AVX-512
    // build; a saturating `as u64` stays scalar, with branches): NaN and negatives -> 0 (`max`
    // ignores a NaN), at most 2^64 - 2^40 units
    let units = |x: f32| {
        let y = (x * UNIT_SCALE).max(0.0).min(MAX_UNITS);
        // SAFETY: y is finite and in [0, 2^64), where the conversion is defined.
        unsafe { y.to_int_unchecked::<u64>() }
    };
    let mut acc = [0u64; LANES];
    let groups = v.chunks_exact(LANES);
    let tail = groups.remainder();
    for g in groups {
        for i in 0..LANES {
            acc[i] = acc[i].wrapping_add(units(g[i]));
        }
    }
    let total = acc.iter().chain(&[tail.iter().fold(0u64, |s, &x| s.wrapping_add(units(x)))]).fold(0u64, |s, &x| s.wrapping_add(x));
    // one rounding (u64 -> f32), then an exact scaling by a power of two
    total as f32 * (1.0 / UNIT_SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect()
    }

    /// The module's order written out plainly: lane sums, the pairwise tree, then the tail.
    fn by_hand(v: &[f64]) -> f64 {
        let full = v.len() / LANES * LANES;
        let mut lanes: Vec<f64> = (0..LANES).map(|l| (l..full).step_by(LANES).fold(0.0, |s, i| s + v[i])).collect();
        for w in [8, 4, 2, 1] {
            for i in 0..w {
                lanes[i] += lanes[i + w];
            }
        }
        v[full..].iter().fold(lanes[0], |s, x| s + x)
    }

    // Every reduction equals the order written out by hand, bit for bit, for every tail length;
    // and equals the exact (f64) value within rounding.
    #[test]
    fn reductions_follow_the_stated_order() {
        for n in [0usize, 1, 5, 15, 16, 17, 31, 32, 33, 256, 577, 49152] {
            let (a, b, c) = (data(n, 1), data(n, 2), data(n, 3));
            let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            assert_eq!(sum(&a64, 0.0), by_hand(&a64), "sum n={n}");
            let prods: Vec<f64> = a64.iter().zip(&b).map(|(x, &y)| x * y as f64).collect();
            let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            assert_eq!(dot(&a64, &b64, 0.0), by_hand(&prods), "dot n={n}");
            let sq: Vec<f64> = a.iter().map(|&x| (x as f64) * (x as f64)).collect();
            assert_eq!(sum_f64(&a, |x| (x as f64) * (x as f64)), by_hand(&sq), "sum_f64 n={n}");
            let t: Vec<f64> = (0..n).map(|i| a[i] as f64 * b[i] as f64 * c[i] as f64).collect();
            assert_eq!(sum3_f64(&a, &b, &c, |x, y, z| x as f64 * y as f64 * z as f64), by_hand(&t), "sum3 n={n}");
            let exact: f64 = a64.iter().sum();
            let bound = a64.iter().map(|x| x.abs()).sum::<f64>() * (n as f64) * f32::EPSILON as f64;
            assert!((sum(&a, 0.0f32) as f64 - exact).abs() <= bound + 1e-30, "f32 sum n={n}");
            if n > 0 {
                assert_eq!(max(&a), a.iter().copied().fold(a[0], |m, x| if x > m { x } else { m }), "max n={n}");
            }
        }
    }

    // The fixed-point sum: independent of order and of zeros inserted anywhere (bit for bit),
    // within n 2^-40 of the exact sum, the baseline and AVX-512 builds equal.
    #[test]
    fn unit_sum_is_associative_and_close() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for n in [1usize, 7, 16, 33, 256, 1000] {
            let mut v: Vec<f32> = (0..n).map(|_| (-rng.random::<f32>() * 30.0).exp()).collect();
            v[n / 2] = 1.0;
            let s = sum_unit(&v);
            let exact: f64 = v.iter().map(|&x| x as f64).sum();
            assert!((s as f64 - exact).abs() <= n as f64 * 2f64.powi(-40) + exact * f32::EPSILON as f64 / 2.0, "n={n}: {s} vs {exact}");
            let mut spread = Vec::new();
            for (i, &x) in v.iter().rev().enumerate() {
                spread.push(x);
                spread.extend(std::iter::repeat_n(0.0, i % 5));
            }
            assert_eq!(sum_unit(&spread).to_bits(), s.to_bits(), "n={n}: reversed with zeros inserted");
            assert_eq!(sum_unit_portable(&v).to_bits(), s.to_bits());
        }
        assert_eq!(sum_unit(&[]), 0.0);
        assert_eq!(sum_unit(&[1.0; 300]), 300.0);
        // outside [0, 1]: values below 2^24 counted, negatives and NaN as 0
        assert_eq!(sum_unit(&[3.5, 1000.25, -2.0, f32::NAN, 0.5]), 1004.25);
        assert_eq!(sum_unit_portable(&[3.5, 1000.25, -2.0, f32::NAN, 0.5]), 1004.25);
    }

    // A NaN is never chosen over a number; the baseline and AVX-512 builds agree.
    #[test]
    fn max_skips_nan_and_builds_agree() {
        let v = [1.0f32, f32::NAN, 3.0, -2.0, f32::NAN, 0.5];
        assert_eq!(max(&v), 3.0);
        // signed zeros compare equal: either may come back, as a value it is 0
        let z: Vec<f32> = (0..40).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }).collect();
        assert_eq!(max(&z), 0.0);
        assert_eq!(max(&[-1.0f32, -0.0, -3.0]), 0.0);
        let a = data(1000, 9);
        assert_eq!(sum(&a, 0.0f32).to_bits(), sum_portable(&a, 0.0f32).to_bits());
        assert_eq!(dot(&a, &a, 0.0f32).to_bits(), dot_portable(&a, &a, 0.0f32).to_bits());
    }
}

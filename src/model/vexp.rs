//! `exp` over f32 slices, vectorised: the softmax and log-softmax kernels' one transcendental.
//!
//! libm's scalar `expf` was ~7% of a bf16 training step (attention softmax, recomputed in the
//! backward, and the LM head's log-softmax over 49152 logits per completion token). Here the
//! Cephes `expf` scheme (S. L. Moshier, Cephes Math Library, `expf.c`): `n = round(x log2 e)`,
//! `r = x - n ln 2` (ln 2 split in two for an exact reduction), `e^r` by a degree-7 polynomial
//! (Cephes' coefficients), `e^x = 2^n e^r` by building the exponent bits; relative error below
//! 2e-7 (tested against f64 `exp` below). Written without branches, `mul_add` or `round`, so
//! the compiler vectorises the loop, once for AVX-512 (selected at run time) and once for the
//! baseline; both compile the same operations, so they give the same bits.
//!
//! Range: `x < -87` gives exactly 0 (libm's `expf` gives values down to ~1e-45 until -103.9:
//! `e^-87` is 1.6e-38, the bottom of f32's normal range; the masked attention entries at -1e9
//! all land there), and `x > 88` gives `+inf` (libm stays finite up to 88.72). Both ends are
//! far outside what softmax (`x - max <= 0`), log-softmax and SwiGLU's `exp(-g)` can tell apart.

/// `v[i] = e^{v[i]}` for every element (see the module doc for accuracy and range).
pub fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: the CPU supports AVX-512F (checked at run time just above).
            unsafe { exp_avx512(v) };
            return;
        }
    }
    exp_portable(v)
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(v: &mut [f32]) {
    exp_portable(v)
}

#[inline(always)]
fn exp_portable(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = exp1(*x);
    }
}

#[inline(always)]
fn exp1(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = C1 + C2, C1 exact in few bits, so n * C1 is exact for |n| < 2^15
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (ties to even)
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // the integer n from t's low mantissa bits (t = 1.5 * 2^23 + n exactly): a float-to-int
    // cast would saturate lane by lane and keep the loop from vectorising
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * C1) - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5.000_000_1e-1;
    let er = p * z + r + 1.0;
    // 2^n from the exponent bits; n is in [-126, 127] after the clamp
    let two_n = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let y = er * two_n;
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_below_2e_7_over_the_range() {
        let mut xs: Vec<f32> = (0..200_001).map(|i| -87.0 + 175.0 * i as f32 / 200_000.0).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, std::f32::consts::LN_2, -86.99, 87.99]);
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        let mut portable = xs.clone();
        exp_portable(&mut portable);
        for ((&x, &y), &p) in xs.iter().zip(&ys).zip(&portable) {
            let want = (x as f64).exp();
            let rel = ((y as f64) - want).abs() / want;
            assert!(rel < 2e-7, "exp({x}) = {y}, want {want}: rel {rel:e}");
            assert_eq!(y.to_bits(), p.to_bits(), "dispatched and portable paths differ at {x}");
        }
    }

    #[test]
    fn range_ends() {
        let mut v = [-1e9f32, -87.5, -f32::INFINITY, 89.0, f32::INFINITY, 0.0];
        exp_in_place(&mut v);
        assert_eq!(v, [0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY, 1.0]);
    }
}

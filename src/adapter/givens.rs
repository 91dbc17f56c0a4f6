//! Brick-wall Givens rotations on activations: the fine-grained part `G = G_1 ··· G_S` of `R = H G`.
//!
//! Spec: `../shared/docs/ropo-method.md`, "The adapted layer". Stage `s` (1-based) rotates
//! disjoint coordinate pairs `(p, p+1)`: `p = 0, 2, 4, …` when `s` is odd (`floor(d/2)` angles),
//! `p = 1, 3, 5, …` when `s` is even (`floor((d-1)/2)` angles); angle k of a stage belongs to the
//! stage's k-th pair. `G_s` maps `x_p' = cos θ x_p - sin θ x_q`, `x_q' = sin θ x_p + cos θ x_q`;
//! coordinates in no pair are left alone.
//!
//! Angle layout (this project's choice, recorded in the adapter config): ONE vector `theta` of
//! length [`num_angles`] holding all stages' angles concatenated in stage order
//! (stage 1's, then stage 2's, …), see [`stage_ranges`].
//!
//! On activations the layer needs `G^T x = G_S^T ··· G_1^T x` (stage 1 first, angles negated).
//! It is built from narrow / reshape / stack / cat (elementwise on `(N, d)`): never a d x d
//! matrix in training. The dense `G` is for merging only ([`dense`]).

use candle_core::{Result, Tensor, D};

/// Offset of stage `s`'s first pair: 0 for odd stages, 1 for even ones (`s` is 1-based).
pub fn stage_offset(s: usize) -> usize {
    if s % 2 == 1 {
        0
    } else {
        1
    }
}

/// Number of angles of stage `s` (1-based) for dimension `d`: `floor((d - offset) / 2)`.
pub fn stage_len(d: usize, s: usize) -> usize {
    d.saturating_sub(stage_offset(s)) / 2
}

/// `(start, len)` of each stage's angles inside the concatenated `theta`, stages 1..=S.
pub fn stage_ranges(d: usize, stages: usize) -> Vec<(usize, usize)> {
    let mut start = 0;
    (1..=stages)
        .map(|s| {
            let len = stage_len(d, s);
            let r = (start, len);
            start += len;
            r
        })
        .collect()
}

/// Total number of Givens angles for `stages` brick-wall stages at dimension `d`.
pub fn num_angles(d: usize, stages: usize) -> usize {
    (1..=stages).map(|s| stage_len(d, s)).sum()
}

/// `G_s^T x` for rows `x (N, d)`, stage angles `angles (k,)`, first pair at `offset`.
///
/// Pair `(p, q)` with angle θ: `x_p' = cos θ x_p + sin θ x_q`, `x_q' = -sin θ x_p + cos θ x_q`.
fn stage_t(x: &Tensor, angles: &Tensor, offset: usize) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let k = angles.dim(0)?;
    if k == 0 {
        return Ok(x.clone());
    }
    let mid = x.narrow(1, offset, 2 * k)?.reshape((rows, k, 2))?; // (N, k, 2)
    let a = mid.narrow(2, 0, 1)?.squeeze(2)?; // x_p, (N, k)
    let b = mid.narrow(2, 1, 1)?.squeeze(2)?; // x_q, (N, k)
    let c = angles.cos()?.unsqueeze(0)?; // (1, k)
    let s = angles.sin()?.unsqueeze(0)?;
    let a2 = (a.broadcast_mul(&c)? + b.broadcast_mul(&s)?)?;
    let b2 = (b.broadcast_mul(&c)? - a.broadcast_mul(&s)?)?;
    let mid2 = Tensor::stack(&[a2, b2], 2)?.reshape((rows, 2 * k))?; // (N, k, 2) -> (N, 2k)
    let tail = d - offset - 2 * k;
    let mut parts = Vec::with_capacity(3);
    if offset > 0 {
        parts.push(x.narrow(1, 0, offset)?);
    }
    parts.push(mid2);
    if tail > 0 {
        parts.push(x.narrow(1, offset + 2 * k, tail)?);
    }
    Tensor::cat(&parts, 1)
}

/// `G_S^T ··· G_1^T x` for every row of `x (..., d)`; `theta (num_angles(d, stages),)`, same dtype.
///
/// `stages = 0` returns `x`. Errors: `theta` of the wrong length.
pub fn rotate_t(x: &Tensor, theta: &Tensor, stages: usize) -> Result<Tensor> {
    if stages == 0 {
        return Ok(x.clone());
    }
    let dims = x.dims().to_vec();
    let d = x.dim(D::Minus1)?;
    let want = num_angles(d, stages);
    let got = theta.dims1()?;
    if got != want {
        candle_core::bail!("givens: theta has {got} angles, {stages} stages at d={d} need {want}");
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let mut xf = x.reshape((rows, d))?;
    for (s, (start, len)) in stage_ranges(d, stages).into_iter().enumerate() {
        xf = stage_t(&xf, &theta.narrow(0, start, len)?, stage_offset(s + 1))?;
    }
    xf.reshape(dims)
}

/// The dense `G = G_1 ··· G_S`, `(d, d)`, for merging only.
///
/// Built as `rotate_t(I)`: row n of the result is `(G^T e_n)^T`, i.e. row n of `G`.
pub fn dense(theta: &Tensor, d: usize, stages: usize) -> Result<Tensor> {
    rotate_t(&Tensor::eye(d, theta.dtype(), theta.device())?, theta, stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn stage_sizes_follow_the_brick_wall() {
        // d=8: stage 1 pairs (0,1)(2,3)(4,5)(6,7); stage 2 pairs (1,2)(3,4)(5,6)
        assert_eq!(stage_ranges(8, 3), vec![(0, 4), (4, 3), (7, 4)]);
        // d=7: stage 1 (0,1)(2,3)(4,5); stage 2 (1,2)(3,4)(5,6)
        assert_eq!(stage_ranges(7, 2), vec![(0, 3), (3, 3)]);
        assert_eq!(num_angles(1, 2), 0);
        assert_eq!(num_angles(576, 2), 288 + 287);
    }

    // One angle on pair (0,1) of stage 1: G e_0 = (cos, sin), so G^T x = (c x0 + s x1, -s x0 + c x1).
    #[test]
    fn single_rotation_by_hand() {
        let dev = Device::Cpu;
        let th = 0.3f64;
        let theta = Tensor::new(&[th, 0.0], &dev).unwrap(); // d=5, S=1: 2 angles
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0, 5.0]], &dev).unwrap();
        let y = rotate_t(&x, &theta, 1).unwrap().to_vec2::<f64>().unwrap();
        let (c, s) = (th.cos(), th.sin());
        let want = [c * 1.0 + s * 2.0, -s * 1.0 + c * 2.0, 3.0, 4.0, 5.0];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
        let g = dense(&theta, 5, 1).unwrap().to_vec2::<f64>().unwrap();
        assert!((g[0][0] - c).abs() < 1e-15 && (g[0][1] + s).abs() < 1e-15);
        assert!((g[1][0] - s).abs() < 1e-15 && (g[1][1] - c).abs() < 1e-15);
    }

    // Orthogonality and gradients flow into every angle of every stage.
    #[test]
    fn orthogonal_and_differentiable() {
        let dev = Device::Cpu;
        let d = 9;
        let n = num_angles(d, 3);
        let vals: Vec<f64> = (0..n).map(|i| 0.1 + 0.37 * i as f64).collect();
        let theta = Var::from_vec(vals, n, &dev).unwrap();
        let g = dense(theta.as_tensor(), d, 3).unwrap();
        let eye = Tensor::eye(d, DType::F64, &dev).unwrap();
        assert!(max_abs(&g.t().unwrap().matmul(&g).unwrap(), &eye) < 1e-14);
        let x = Tensor::arange(0.0f64, 27.0, &dev).unwrap().reshape((3, d)).unwrap();
        let y = rotate_t(&x, theta.as_tensor(), 3).unwrap();
        assert!(max_abs(&y, &x.matmul(&g).unwrap()) < 1e-12);
        let w = Tensor::arange(1.0f64, 28.0, &dev).unwrap().reshape((3, d)).unwrap().sin().unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = grads.get(&theta).expect("no gradient for theta").to_vec1::<f64>().unwrap();
        assert!(gt.iter().all(|v| v.abs() > 1e-9), "some angle got no gradient: {gt:?}");
    }
}

//! Hyperspherical energy of a weight matrix's neurons (spec "Why" and property 3).
//!
//! `HE(W) = Σ_{i≠j} 1 / ||ŵ_i - ŵ_j||`, `ŵ_i = w_i / ||w_i||` (Liu et al. 2018, "Learning towards
//! minimum hyperspherical energy"; the RoPO paper's measure of neuron collapse). Computed in f64
//! through the Gram matrix of the normalized rows: `||ŵ_i - ŵ_j||² = 2 - 2 ŵ_i·ŵ_j`.

use candle_core::{DType, Result, Tensor};

/// Cosines between the normalized rows of `w (n, d)`: `(n, n)` in f64.
pub fn row_cosines(w: &Tensor) -> Result<Tensor> {
    let w = w.to_dtype(DType::F64)?;
    let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?;
    let wn = w.broadcast_div(&norms)?;
    wn.matmul(&wn.t()?)
}

/// `HE(W) = Σ_{i≠j} 1 / ||ŵ_i - ŵ_j||` over the rows of `w (n, d)` (any float dtype), in f64.
///
/// Both orders of each pair are counted (as the formula's `i ≠ j` says). Two parallel rows give
/// `+inf`; a zero row gives NaN. Cost: one `(n, d) x (d, n)` matmul.
pub fn hyperspherical_energy(w: &Tensor) -> Result<f64> {
    let c = row_cosines(w)?.to_vec2::<f64>()?;
    let mut he = 0.0;
    for (i, row) in c.iter().enumerate() {
        for (j, &cij) in row.iter().enumerate() {
            if i != j {
                he += 1.0 / (2.0 - 2.0 * cij).max(0.0).sqrt();
            }
        }
    }
    Ok(he)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // Three unit vectors at 120°: each distance is sqrt(3), 6 ordered pairs -> 6/sqrt(3).
    #[test]
    fn energy_of_an_equilateral_triangle() {
        let s = 3f64.sqrt() / 2.0;
        let w = Tensor::new(&[[1.0f64, 0.0], [-0.5, s], [-0.5, -s]], &Device::Cpu).unwrap();
        let he = hyperspherical_energy(&(w * 3.0).unwrap()).unwrap(); // scale does not matter
        assert!((he - 6.0 / 3f64.sqrt()).abs() < 1e-12, "{he}");
    }
}

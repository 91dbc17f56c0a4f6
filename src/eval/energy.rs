//! Hyperspherical energy of the neurons of a weight matrix, base vs adapted.
//!
//! For `W` of shape `(n, d)` (n neurons = rows, the candle/PyTorch layout) with rows `w_i`,
//! `ŵ_i = w_i / ||w_i||` and
//!
//! ```text
//! HE(W) = Σ_{i != j} 1 / ||ŵ_i - ŵ_j||      (ordered pairs: each unordered pair counted twice)
//! ```
//!
//! (Liu et al. 2018, "Learning towards Minimum Hyperspherical Energy", NeurIPS, with s = 1;
//! used by the RoPO paper, arXiv 2508.17637, and `docs/ropo-method.md`, property 3.)
//! A high energy means neurons crowd together ("neuron collapse"). A rotation `W -> W R^T`
//! keeps every angle between rows, so it keeps HE exactly; only the magnitude vector of a RoPO
//! adapter cannot change it either (it rescales rows, and rows are normalised), so RoPO's HE
//! change is 0 up to float rounding by construction, while an unconstrained update changes it.
//!
//! Computation: in f64 on the CPU, whatever the weight's dtype. For unit rows
//! `||ŵ_i - ŵ_j||² = 2 - 2 ŵ_i·ŵ_j`; the Gram matrix is built one block of rows at a time
//! (`BLOCK x n`, so memory stays `O(BLOCK·n)` for n up to a few thousand) with a matmul, and
//! the distances are clamped at 0 against rounding. In f64 the cancellation in `2 - 2c` costs
//! about 1e-16 absolute, negligible for distances between real neurons (>> 1e-6).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::linear::Linear;

/// Rows of the Gram matrix computed per block.
const BLOCK: usize = 256;

/// The rows of `w (n, d)` (any float dtype, any device) divided by their norms: `(n, d)` f64 on
/// the CPU. Errors: `w` not 2-D, or a row of norm 0 or not finite (its direction is undefined),
/// naming the row.
fn unit_rows(w: &Tensor) -> Result<Tensor> {
    w.dims2()?;
    let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?; // (n, 1)
    if let Some(i) = norms.flatten_all()?.to_vec1::<f64>()?.iter().position(|&x| x == 0.0 || !x.is_finite()) {
        return Err(Error::Msg(format!("hyperspherical energy: row {i} has norm 0 or is not finite")));
    }
    Ok(w.broadcast_div(&norms)?)
}

/// Cosines between the rows of `w (n, d)`: `ŵ_i·ŵ_j` as an `(n, n)` f64 CPU tensor (the whole
/// Gram matrix at once, `O(n²)` memory; [`hyperspherical_energy`] builds it block by block).
/// A rotation `W -> W R^T` keeps it exactly (spec property 3). Errors: as [`hyperspherical_energy`].
pub fn row_cosines(w: &Tensor) -> Result<Tensor> {
    let unit = unit_rows(w)?;
    Ok(unit.matmul(&unit.t()?)?)
}

/// `HE(W)` for a weight `w` of shape `(n, d)` (any float dtype, any device), in f64.
///
/// Rows that coincide after normalisation give an infinite (or, through rounding, a very
/// large) energy, which is the value of the formula. Errors: `w` not 2-D, or a row of norm 0
/// (its direction is undefined), naming the row.
pub fn hyperspherical_energy(w: &Tensor) -> Result<f64> {
    let unit = unit_rows(w)?; // (n, d), rows of norm 1
    let n = unit.dim(0)?;
    let unit_t = unit.t()?.contiguous()?; // (d, n)
    let mut total = 0.0f64;
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        let gram = unit.narrow(0, start, len)?.matmul(&unit_t)?; // (len, n): cosines
        for (bi, row) in gram.to_vec2::<f64>()?.iter().enumerate() {
            let i = start + bi;
            for (j, &cos) in row.iter().enumerate() {
                if j != i {
                    total += 1.0 / (2.0 - 2.0 * cos).max(0.0).sqrt();
                }
            }
        }
    }
    Ok(total)
}

/// `(adapted - base) / base`: the relative change of an energy (0 for an unchanged one).
pub fn relative_change(base: f64, adapted: f64) -> f64 {
    (adapted - base) / base
}

/// The energy of one adapted layer before and after its adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEnergy {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub layer: String,
    /// `HE(W)` of the frozen base weight.
    pub base: f64,
    /// `HE(W')` of the merged weight (`Adapter::merged`).
    pub adapted: f64,
    /// `(adapted - base) / base`.
    pub relative_change: f64,
}

/// Energies of every adapted layer, with summary figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyReport {
    /// One entry per layer that has an adapter, in the model's layer order.
    pub layers: Vec<LayerEnergy>,
    /// Mean of `relative_change` over the layers (0 when there is none).
    pub mean_relative_change: f64,
    /// Largest `|relative_change|` over the layers (0 when there is none).
    pub max_abs_relative_change: f64,
}

impl EnergyReport {
    /// The report of these layers, with the summary figures computed.
    pub fn new(layers: Vec<LayerEnergy>) -> Self {
        let k = layers.len();
        let mean = if k == 0 { 0.0 } else { layers.iter().map(|l| l.relative_change).sum::<f64>() / k as f64 };
        let max = layers.iter().map(|l| l.relative_change.abs()).fold(0.0, f64::max);
        Self { layers, mean_relative_change: mean, max_abs_relative_change: max }
    }
}

/// Base and adapted energy of one layer: `HE(W)` and `HE(W')`, `W'` from `Adapter::merged`.
/// `None` when the layer has no adapter.
pub fn layer_energy(linear: &Linear) -> Result<Option<LayerEnergy>> {
    let Some(adapter) = &linear.adapter else { return Ok(None) };
    let ctx = |e: Error| Error::Msg(format!("{}: {e}", linear.path));
    let base = hyperspherical_energy(&linear.weight).map_err(ctx)?;
    let (merged, _bias) = adapter.merged(linear)?;
    let adapted = hyperspherical_energy(&merged).map_err(ctx)?;
    Ok(Some(LayerEnergy { layer: linear.path.clone(), base, adapted, relative_change: relative_change(base, adapted) }))
}

/// [`layer_energy`] for every layer that has an adapter, with `on_layer` called after each
/// layer (for a progress bar).
pub fn adapted_energies<'a>(
    linears: impl IntoIterator<Item = &'a Linear>,
    mut on_layer: impl FnMut(&str),
) -> Result<EnergyReport> {
    let mut layers = Vec::new();
    for linear in linears {
        if let Some(e) = layer_energy(linear)? {
            on_layer(&linear.path);
            layers.push(e);
        }
    }
    Ok(EnergyReport::new(layers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn by_hand() -> Result<()> {
        // rows (3, 0), (0, 0.5), (-2, 0) normalise to e1, e2, -e1:
        // ||e1 - e2|| = √2, ||e1 + e1|| = 2, ||e2 + e1|| = √2
        // HE = 2 · (1/√2 + 1/2 + 1/√2) = 2√2 + 1   (ordered pairs)
        let w = Tensor::from_vec(vec![3.0f32, 0.0, 0.0, 0.5, -2.0, 0.0], (3, 2), &Device::Cpu)?;
        let he = hyperspherical_energy(&w)?;
        assert!((he - (2.0 * 2f64.sqrt() + 1.0)).abs() < 1e-12, "{he}");
        // two orthogonal unit rows: 2 · 1/√2 = √2
        let w = Tensor::from_vec(vec![0.0f64, 2.0, 0.0, 0.0, 0.0, -1.0], (2, 3), &Device::Cpu)?;
        assert!((hyperspherical_energy(&w)? - 2f64.sqrt()).abs() < 1e-12);
        Ok(())
    }

    // Three unit vectors at 120°: each distance is sqrt(3), 6 ordered pairs -> 6/sqrt(3); the
    // scale of the rows does not matter, and the cosines are -1/2 off the diagonal.
    #[test]
    fn equilateral_triangle() -> Result<()> {
        let s = 3f64.sqrt() / 2.0;
        let w = (Tensor::new(&[[1.0f64, 0.0], [-0.5, s], [-0.5, -s]], &Device::Cpu)? * 3.0)?;
        let he = hyperspherical_energy(&w)?;
        assert!((he - 6.0 / 3f64.sqrt()).abs() < 1e-12, "{he}");
        let c = row_cosines(&w)?.to_vec2::<f64>()?;
        for (i, row) in c.iter().enumerate() {
            for (j, &cij) in row.iter().enumerate() {
                let want = if i == j { 1.0 } else { -0.5 };
                assert!((cij - want).abs() < 1e-12, "cos[{i}][{j}] = {cij}");
            }
        }
        Ok(())
    }

    #[test]
    fn blocks_match_direct_sum() -> Result<()> {
        // n > BLOCK exercises the blockwise path; compare with the direct O(n² d) definition.
        let (n, d) = (300, 7);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let v: Vec<f64> = (0..n * d).map(|_| StandardNormal.sample(&mut rng)).collect();
        let rows: Vec<Vec<f64>> = v.chunks(d).map(|r| {
            let nr = r.iter().map(|x| x * x).sum::<f64>().sqrt();
            r.iter().map(|x| x / nr).collect()
        }).collect();
        let mut direct = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    direct += 1.0 / rows[i].iter().zip(&rows[j]).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
                }
            }
        }
        let he = hyperspherical_energy(&Tensor::from_vec(v, (n, d), &Device::Cpu)?)?;
        assert!(((he - direct) / direct).abs() < 1e-10, "{he} vs {direct}");
        Ok(())
    }

    /// A random orthogonal `d x d` matrix: the product of d random Householder reflections.
    fn random_orthogonal(d: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f64> {
        let mut q: Vec<f64> = (0..d * d).map(|k| if k / d == k % d { 1.0 } else { 0.0 }).collect();
        for _ in 0..d {
            let u: Vec<f64> = (0..d).map(|_| StandardNormal.sample(rng)).collect();
            let uu: f64 = u.iter().map(|x| x * x).sum();
            // q <- q (I - 2 u u^T / u^T u)
            for r in 0..d {
                let qu: f64 = (0..d).map(|c| q[r * d + c] * u[c]).sum();
                for c in 0..d {
                    q[r * d + c] -= 2.0 * qu * u[c] / uu;
                }
            }
        }
        q
    }

    #[test]
    fn rotation_invariant() -> Result<()> {
        // HE(W Q^T) = HE(W) for orthogonal Q (angles between rows are kept); relative tolerance
        // 1e-10: f64 rounding of the products, far below any real change.
        let (n, d) = (40, 16);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let w: Vec<f64> = (0..n * d).map(|_| StandardNormal.sample(&mut rng)).collect();
        let w = Tensor::from_vec(w, (n, d), &Device::Cpu)?;
        let q = Tensor::from_vec(random_orthogonal(d, &mut rng), (d, d), &Device::Cpu)?;
        // Q^T Q = I
        let qtq = q.t()?.matmul(&q)?.sub(&Tensor::eye(d, DType::F64, &Device::Cpu)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(qtq < 1e-12, "{qtq}");
        let base = hyperspherical_energy(&w)?;
        let rotated = hyperspherical_energy(&w.matmul(&q.t()?)?)?;
        assert!(relative_change(base, rotated).abs() < 1e-10, "{base} vs {rotated}");
        // row scaling (RoPO's magnitude) does not change it either
        let scale = Tensor::from_vec((1..=n).map(|k| k as f64 * 0.3).collect::<Vec<_>>(), (n, 1), &Device::Cpu)?;
        let scaled = hyperspherical_energy(&w.broadcast_mul(&scale)?)?;
        assert!(relative_change(base, scaled).abs() < 1e-10);
        // and a non-orthogonal change does: the test can fail
        let sheared = w.narrow(1, 0, 1)?.broadcast_add(&w)?; // add column 0 to every column
        assert!(relative_change(base, hyperspherical_energy(&sheared)?).abs() > 1e-3);
        Ok(())
    }

    #[test]
    fn zero_row_is_an_error() {
        let w = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 0.0], (2, 2), &Device::Cpu).unwrap();
        let err = hyperspherical_energy(&w).unwrap_err().to_string();
        assert!(err.contains("row 1"), "{err}");
    }

    #[test]
    fn report_summary() {
        let l = |c: f64| LayerEnergy { layer: "x".into(), base: 1.0, adapted: 1.0 + c, relative_change: c };
        let r = EnergyReport::new(vec![l(0.1), l(-0.3)]);
        assert!((r.mean_relative_change - (-0.1)).abs() < 1e-15);
        assert!((r.max_abs_relative_change - 0.3).abs() < 1e-15);
        let r = EnergyReport::new(vec![]);
        assert_eq!((r.mean_relative_change, r.max_abs_relative_change), (0.0, 0.0));
    }
}

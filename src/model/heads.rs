//! Attention heads in and out of the projections' row layout, RoPE and the query scale fused.
//!
//! A projection gives `(N*T, H*hd)` rows (token-major); attention wants `(N, H, T, hd)`
//! (head-major). Composed from candle ops this is `reshape -> transpose -> contiguous -> rope ->
//! affine` (five graph nodes, three passes over the activation, and in backward a zero gradient
//! plus an addition at every node). [`to_heads`] does it in one pass with one node, its backward
//! the transpose (the transposed rotation, `-sin`, the same scale, back to rows); [`from_heads`]
//! is the way back for the attention output (`transpose -> reshape`).
//!
//! RoPE as HF `apply_rotary_pos_emb` (`x cos + rotate_half(x) sin`), tables from
//! [`crate::model::ops::rope_tables`]: `(T, hd)`, or `(N, T, hd)` per row. The composed
//! reference each op is tested against: [`to_heads_composed`], [`from_heads_composed`].
//! Dimension legend: N rows of the batch, T positions, H heads, hd head dim.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::model::ops::{data, rope, Real};

/// `x (N*T, H*hd)` -> `(N, H, T, hd)`, each head row rotated by RoPE when `tables = Some((cos,
/// sin))` (constants, no gradient) and multiplied by `scale`. F32/F64; off the CPU (no
/// `cuda_fwd`), [`to_heads_composed`].
///
/// Errors: `N` not dividing the rows, `hd` odd with RoPE, tables of another shape.
pub fn to_heads(x: &Tensor, n: usize, heads: usize, tables: Option<(&Tensor, &Tensor)>, scale: f64) -> Result<Tensor> {
    if !crate::device::cpu_kernels(&x) {
        return to_heads_composed(x, n, heads, tables, scale); // the ops run on the CPU only
    }
    let x = x.contiguous()?;
    match tables {
        Some((cos, sin)) => x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, ToHeadsRope { n, heads, scale }),
        None => x.apply_op1(ToHeads { n, heads, scale }),
    }
}

/// `y (N, H, T, hd)` -> `(N*T, H*hd)` (the inverse layout change of [`to_heads`], no rotation).
pub fn from_heads(y: &Tensor) -> Result<Tensor> {
    if !crate::device::cpu_kernels(&y) {
        return from_heads_composed(y); // the op runs on the CPU only
    }
    y.contiguous()?.apply_op1(FromHeads { scale: 1.0 })
}

/// [`to_heads`] composed from differentiable candle ops (the reference).
pub fn to_heads_composed(x: &Tensor, n: usize, heads: usize, tables: Option<(&Tensor, &Tensor)>, scale: f64) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    let (t, hd) = (rows / n.max(1), width / heads.max(1));
    let y = x.reshape((n, t, heads, hd))?.transpose(1, 2)?.contiguous()?;
    let y = match tables {
        Some((cos, sin)) => rope(&y, cos, sin)?,
        None => y,
    };
    y.affine(scale, 0.0)
}

/// [`from_heads`] composed from differentiable candle ops (the reference).
pub fn from_heads_composed(y: &Tensor) -> Result<Tensor> {
    let (n, h, t, hd) = y.dims4()?;
    y.transpose(1, 2)?.reshape((n * t, h * hd))
}

/// Geometry of one layout change: `N`, `T`, `H`, `hd`.
#[derive(Clone, Copy)]
struct Geo {
    n: usize,
    t: usize,
    h: usize,
    hd: usize,
}

/// The RoPE tables of one call: `cos`, `sin` and the per-row flag (the inverse rotation is
/// `sign = -1` in [`rotate_row`]).
type Tables<'a, T> = Option<(&'a [T], &'a [T], bool)>;

/// `dst = scale * R(src)` for one head row; `R` the RoPE rotation at table row `p` (identity
/// without tables); `sign = -1` applies `R^T`, exact for tables whose two halves repeat
/// (`cos[i] = cos[i + hd/2]`, `sin[i] = sin[i + hd/2]`, as [`crate::model::ops::rope_tables`]
/// builds them, and as `RopeOp`'s backward assumes too).
#[inline]
fn rotate_row<T: Real>(dst: &mut [T], src: &[T], tables: Tables<'_, T>, p: usize, sign: T, scale: T) {
    let hd = src.len();
    match tables {
        None => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s * scale;
            }
        }
        Some((cos, sin, _)) => {
            let half = hd / 2;
            let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
            for i in 0..half {
                let (x1, x2) = (src[i], src[i + half]);
                dst[i] = (x1 * c[i] - x2 * s[i] * sign) * scale;
                dst[i + half] = (x2 * c[i + half] + x1 * s[i + half] * sign) * scale;
            }
        }
    }
}

/// The table row of position `tt` of batch row `b`.
fn table_row<T>(tables: Tables<'_, T>, g: Geo, b: usize, tt: usize) -> usize {
    match tables {
        Some((_, _, true)) => b * g.t + tt,
        _ => tt,
    }
}

/// Rows `(N*T, H*hd)` -> heads `(N, H, T, hd)`, rotated and scaled.
fn rows_to_heads<T: Real>(x: &[T], g: Geo, tables: Tables<'_, T>, sign: T, scale: T) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    if out.is_empty() {
        return out;
    }
    let width = g.h * g.hd;
    // one task per (b, head): T rows of hd
    out.par_chunks_mut(g.t * g.hd).enumerate().for_each(|(bh, o)| {
        let (b, head) = (bh / g.h, bh % g.h);
        for (tt, dst) in o.chunks_mut(g.hd).enumerate() {
            let src = &x[(b * g.t + tt) * width + head * g.hd..][..g.hd];
            rotate_row(dst, src, tables, table_row(tables, g, b, tt), sign, scale);
        }
    });
    out
}

/// Heads `(N, H, T, hd)` -> rows `(N*T, H*hd)`, rotated and scaled.
fn heads_to_rows<T: Real>(y: &[T], g: Geo, tables: Tables<'_, T>, sign: T, scale: T) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    if out.is_empty() {
        return out;
    }
    let width = g.h * g.hd;
    // one task per output row (b, t): H heads of hd
    out.par_chunks_mut(width).enumerate().for_each(|(bt, o)| {
        let (b, tt) = (bt / g.t, bt % g.t);
        for (head, dst) in o.chunks_mut(g.hd).enumerate() {
            let src = &y[((b * g.h + head) * g.t + tt) * g.hd..][..g.hd];
            rotate_row(dst, src, tables, table_row(tables, g, b, tt), sign, scale);
        }
    });
    out
}

/// Checks `(rows, width)` against `n` and `heads`; returns the geometry.
fn rows_geo(l: &Layout, n: usize, heads: usize, op: &str) -> Result<Geo> {
    let (rows, width) = l.shape().dims2()?;
    if n == 0 || heads == 0 || rows % n != 0 || width % heads != 0 {
        candle_core::bail!("{op}: x ({rows}, {width}) does not split into {n} batch rows and {heads} heads");
    }
    Ok(Geo { n, t: rows / n, h: heads, hd: width / heads })
}

/// Checks the RoPE tables against the geometry; returns whether they are per row.
fn check_tables(g: Geo, lc: &Layout, ls: &Layout, op: &str) -> Result<bool> {
    let (t, hd, n) = (g.t, g.hd, g.n);
    let ok = lc.dims() == ls.dims() && (lc.dims() == [t, hd] || lc.dims() == [n, t, hd]) && hd % 2 == 0;
    if !ok {
        candle_core::bail!("{op}: tables {:?}/{:?} do not fit ({n}, {}, {t}, {hd}) (need (T, hd) or (N, T, hd), hd even)", lc.dims(), ls.dims(), g.h);
    }
    Ok(lc.dims().len() == 3)
}

/// The table storages of a call: `(cos, its layout, sin, its layout, per row)`.
type TableArgs<'a> = Option<(&'a CpuStorage, &'a Layout, &'a CpuStorage, &'a Layout, bool)>;

/// `f(x, tables)` over F32/F64 storages.
macro_rules! on_float {
    ($op:expr, $s:expr, $l:expr, $tabs:expr, |$x:ident, $tb:ident, $cv:ident| $body:expr) => {{
        let tabs: TableArgs<'_> = $tabs;
        match $s {
            CpuStorage::F32(v) => {
                let $x = data(v, $l, $op)?;
                let $tb: Tables<'_, f32> = match tabs {
                    Some((CpuStorage::F32(c), lc, CpuStorage::F32(s), ls, per_row)) => Some((data(c, lc, $op)?, data(s, ls, $op)?, per_row)),
                    Some(_) => candle_core::bail!("{}: tables of another dtype", $op),
                    None => None,
                };
                let $cv = |v: f64| v as f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(v) => {
                let $x = data(v, $l, $op)?;
                let $tb: Tables<'_, f64> = match tabs {
                    Some((CpuStorage::F64(c), lc, CpuStorage::F64(s), ls, per_row)) => Some((data(c, lc, $op)?, data(s, ls, $op)?, per_row)),
                    Some(_) => candle_core::bail!("{}: tables of another dtype", $op),
                    None => None,
                };
                let $cv = |v: f64| v;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: F32 or F64 expected", $op),
        }
    }};
}

/// `(N*T, H*hd) -> (N, H, T, hd)` times `scale`, no rotation; backward: [`FromHeads`].
struct ToHeads {
    n: usize,
    heads: usize,
    scale: f64,
}

impl CustomOp1 for ToHeads {
    fn name(&self) -> &'static str {
        "ropo-to-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = rows_geo(l, self.n, self.heads, self.name())?;
        let sc = self.scale;
        let out = on_float!(self.name(), s, l, None, |x, tb, cv| rows_to_heads(x, g, tb, cv(1.0), cv(sc)));
        Ok((out, Shape::from((g.n, g.h, g.t, g.hd))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&FromHeads { scale: self.scale })?))
    }
}

/// RoPE variant of [`ToHeads`]: `(x, cos, sin)`; backward: [`HeadsToRowsRope`] (`R^T`).
struct ToHeadsRope {
    n: usize,
    heads: usize,
    scale: f64,
}

impl CustomOp3 for ToHeadsRope {
    fn name(&self) -> &'static str {
        "ropo-to-heads-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, sc: &CpuStorage, lc: &Layout, ss: &CpuStorage, ls: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = rows_geo(l, self.n, self.heads, self.name())?;
        let per_row = check_tables(g, lc, ls, self.name())?;
        let scale = self.scale;
        let out = on_float!(self.name(), s, l, Some((sc, lc, ss, ls, per_row)), |x, tb, cv| rows_to_heads(x, g, tb, cv(1.0), cv(scale)));
        Ok((out, Shape::from((g.n, g.h, g.t, g.hd))))
    }

    fn bwd(&self, _x: &Tensor, cos: &Tensor, sin: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = grad_res.contiguous()?.apply_op3_no_bwd(cos, sin, &HeadsToRowsRope { scale: self.scale })?;
        Ok((Some(gx), None, None))
    }
}

/// `(N, H, T, hd) -> (N*T, H*hd)` times `scale`; backward: [`ToHeads`] with the same scale.
/// Also the backward of [`ToHeads`].
struct FromHeads {
    scale: f64,
}

impl CustomOp1 for FromHeads {
    fn name(&self) -> &'static str {
        "ropo-from-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, t, hd) = l.shape().dims4()?;
        let g = Geo { n, t, h, hd };
        let sc = self.scale;
        let out = on_float!(self.name(), s, l, None, |y, tb, cv| heads_to_rows(y, g, tb, cv(1.0), cv(sc)));
        Ok((out, Shape::from((n * t, h * hd))))
    }

    fn bwd(&self, y: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, h, _, _) = y.dims4()?;
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&ToHeads { n, heads: h, scale: self.scale })?))
    }
}

/// Backward of [`ToHeadsRope`]: `(g (N, H, T, hd), cos, sin)` -> `scale * R^T g` as rows.
struct HeadsToRowsRope {
    scale: f64,
}

impl CustomOp3 for HeadsToRowsRope {
    fn name(&self) -> &'static str {
        "ropo-to-heads-rope-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, sc: &CpuStorage, lc: &Layout, ss: &CpuStorage, ls: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, t, hd) = l.shape().dims4()?;
        let g = Geo { n, t, h, hd };
        let per_row = check_tables(g, lc, ls, self.name())?;
        let scale = self.scale;
        let out = on_float!(self.name(), s, l, Some((sc, lc, ss, ls, per_row)), |y, tb, cv| heads_to_rows(y, g, tb, cv(-1.0), cv(scale)));
        Ok((out, Shape::from((n * t, h * hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::rope_tables;
    use crate::model::ops::tests::{max_diff, seeded};
    use candle_core::{DType, Device, Var};

    // Values and input gradients equal the composed reshape/transpose/rope/affine path, with
    // shared tables, per-row tables and no rotation (f64: 1e-12; f32 values: 1e-5).
    #[test]
    fn to_heads_matches_composed_values_and_gradients() -> Result<()> {
        let (n, t, h, hd) = (2, 5, 3, 4);
        let inv: Vec<f64> = (0..hd / 2).map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64)).collect();
        let (cos, sin) = rope_tables(&inv, 2, t, DType::F64, &Device::Cpu)?; // (T, hd), positions 2..
        let (c1, s1) = rope_tables(&inv, 7, t, DType::F64, &Device::Cpu)?;
        let (cos_r, sin_r) = (Tensor::stack(&[&cos, &c1], 0)?, Tensor::stack(&[&sin, &s1], 0)?); // (N, T, hd)
        for (tables, scale) in [(Some((&cos, &sin)), 0.5), (Some((&cos_r, &sin_r)), 1.0), (None, 0.25)] {
            let x = Var::from_tensor(&seeded(&[n * t, h * hd], 1))?;
            let c = seeded(&[n, h, t, hd], 2);
            let fused = to_heads(x.as_tensor(), n, h, tables, scale)?;
            let composed = to_heads_composed(x.as_tensor(), n, h, tables, scale)?;
            assert_eq!(fused.dims(), &[n, h, t, hd]);
            assert!(max_diff(&fused, &composed) < 1e-12);
            let gf = (&fused * &c)?.sum_all()?.backward()?;
            let gc = (&composed * &c)?.sum_all()?.backward()?;
            assert!(max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap()) < 1e-12);
            let x32 = x.as_tensor().to_dtype(DType::F32)?;
            let t32 = tables.map(|(c, s)| (c.to_dtype(DType::F32).unwrap(), s.to_dtype(DType::F32).unwrap()));
            let f32v = to_heads(&x32, n, h, t32.as_ref().map(|(c, s)| (c, s)), scale)?;
            assert!(max_diff(&f32v.to_dtype(DType::F64)?, &composed) < 1e-5);
        }
        assert!(to_heads(&seeded(&[7, 12], 3), 2, 3, None, 1.0).is_err(), "7 rows do not split into 2");
        assert!(to_heads(&seeded(&[10, 12], 3), 2, 3, Some((&cos, &cos.narrow(0, 0, 2)?)), 1.0).is_err(), "mismatched tables");
        Ok(())
    }

    #[test]
    fn from_heads_matches_composed_values_and_gradients() -> Result<()> {
        let y = Var::from_tensor(&seeded(&[2, 3, 5, 4], 4))?;
        let c = seeded(&[10, 12], 5);
        let fused = from_heads(y.as_tensor())?;
        let composed = from_heads_composed(y.as_tensor())?;
        assert_eq!(fused.to_vec2::<f64>()?, composed.to_vec2::<f64>()?);
        let gf = (&fused * &c)?.sum_all()?.backward()?;
        let gc = (&composed * &c)?.sum_all()?.backward()?;
        assert!(max_diff(gf.get(&y).unwrap(), gc.get(&y).unwrap()) < 1e-15);
        Ok(())
    }
}

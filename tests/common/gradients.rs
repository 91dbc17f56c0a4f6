//! Central finite differences in f64, against `backward`: the gradient oracle of the tests.

use candle_core::{Tensor, Var};

/// `(L(w + eps e_i) - L(w - eps e_i)) / 2 eps` for entry `i` (flat index) of the f64 `var`,
/// with `loss` reading the current value of `var`; `var` is restored afterwards.
pub fn central_difference(var: &Var, i: usize, eps: f64, loss: &dyn Fn() -> f64) -> f64 {
    let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let at = |d: f64| {
        let mut w = orig.clone();
        w[i] += d;
        var.set(&Tensor::from_vec(w, var.dims(), var.device()).unwrap()).unwrap();
        loss()
    };
    let (lp, lm) = (at(eps), at(-eps));
    var.set(&Tensor::from_vec(orig, var.dims(), var.device()).unwrap()).unwrap();
    (lp - lm) / (2.0 * eps)
}

/// Every trainable tensor's gradient of `loss` (an f64 scalar) against central finite
/// differences (eps 1e-6, every entry): relative error (L2 over the tensor) below `tol`, and no
/// tensor without a gradient or with an all-zero one. `loss` must read the current values of
/// the `Var`s.
pub fn check_gradients(vars: &[(String, Var)], loss: &dyn Fn() -> Tensor, tol: f64) {
    let grads = loss().backward().unwrap();
    assert!(!vars.is_empty());
    for (name, var) in vars {
        let g = grads.get(var).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let scalar = || loss().to_scalar::<f64>().unwrap();
        let fd: Vec<f64> = (0..g.len()).map(|i| central_difference(var, i, 1e-6, &scalar)).collect();
        let diff: f64 = g.iter().zip(&fd).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let norm = g.iter().map(|a| a * a).sum::<f64>().sqrt().max(fd.iter().map(|a| a * a).sum::<f64>().sqrt());
        assert!(norm > 1e-8, "{name}: zero gradient");
        assert!(diff / norm < tol, "{name}: relative error {} (|g| = {norm})", diff / norm);
    }
}

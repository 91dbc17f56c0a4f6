//! Bake adapters into the weights: `W' = diag(m / rho) · W · R^T` (spec "Merge"), per row
//! `w'_i = (m_i / rho_i) R w_i`, computed in f64 and stored in the weight's dtype.
//!
//! After merging, a linear is an ordinary frozen layer that computes the adapted function
//! (to float tolerance); the model can be exported as a plain HF folder.

use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// Replace the weight (and bias) of every linear that has an adapter by the merged ones and
/// remove the adapter. Returns the number of merged layers.
///
/// Errors: a merged weight with a NaN or infinity (naming the module, as PEFT's `safe_merge`).
/// That module and the ones after it are left unchanged, earlier ones stay merged: callers
/// merge into a model they throw away on error.
pub fn merge_linears(linears: Vec<&mut Linear>) -> Result<usize> {
    let mut merged = 0;
    for lin in linears {
        let Some(adapter) = lin.adapter.clone() else { continue };
        let (w, b) = adapter.merged(lin)?;
        // the sum is finite iff every entry is (a NaN or an infinity propagates)
        if !w.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>()?.is_finite() {
            return Err(Error::Msg(format!(
                "NaN or infinity in the merged weight of {}: the adapter seems to be broken",
                lin.path
            )));
        }
        lin.weight = w;
        lin.bias = b;
        lin.adapter = None;
        merged += 1;
    }
    Ok(merged)
}

/// Bake every adapter of `model` into its weights (see [`merge_linears`]); afterwards
/// `model.forward(.., true)` and `(.., false)` agree and `Model::tensors` lists the merged weights.
pub fn merge_into(model: &mut Model) -> Result<usize> {
    merge_linears(model.linears_mut())
}

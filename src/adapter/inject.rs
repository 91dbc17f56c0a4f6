//! Shared by every method: attaching built adapters to their linears ([`attach_each`]), the
//! parameter counts ([`ParamReport`], [`model_params`]), detaching. Which linears each method
//! wraps, and how its adapters are built, is the method's own module ([`super::ropo`],
//! [`super::lora`], [`super::full`]).

use std::sync::Arc;

use crate::model::linear::{Adapter, Linear};
use crate::model::llama::Model;

/// Trainable / total parameter counts (total = base model + adapters, as PEFT counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamReport {
    /// Adapter parameters (`Σ r·d + A + n` over wrapped layers).
    pub trainable: usize,
    /// Base model parameters plus the adapter's.
    pub total: usize,
}

impl ParamReport {
    /// `trainable / total` (0 for an empty model).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.trainable as f64 / self.total as f64
        }
    }
}

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl std::fmt::Display for ParamReport {
    /// PEFT's `print_trainable_parameters` line:
    /// `trainable params: 1,234 || all params: 135,000,000 || trainable%: 0.0009`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.total),
            100.0 * self.fraction()
        )
    }
}

/// Attach each built adapter (`built`: index into `linears`, adapter) to its linear, in order,
/// and return the shared handles. Cannot fail. One mechanism for RoPO, LoRA and full adapters.
pub(crate) fn attach_each<A: Adapter + 'static>(mut linears: Vec<&mut Linear>, built: Vec<(usize, A)>) -> Vec<Arc<A>> {
    let mut adapters = Vec::with_capacity(built.len());
    for (i, a) in built {
        let a = Arc::new(a);
        linears[i].adapter = Some(a.clone() as Arc<dyn Adapter>);
        adapters.push(a);
    }
    adapters
}

/// The base model's parameter count: every stored tensor once (a tied `lm_head` is not counted
/// twice), as `Model::tensors` lists them.
pub fn model_params(model: &Model) -> usize {
    model.tensors().iter().map(|(_, t)| t.elem_count()).sum()
}

/// Remove every adapter from `model` (it becomes the base model again).
pub fn detach(model: &mut Model) {
    detach_linears(model.linears_mut());
}

/// Remove every adapter from `linears` (the model becomes the base model again).
pub fn detach_linears(linears: Vec<&mut Linear>) {
    for lin in linears {
        lin.adapter = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_like_peft() {
        let r = ParamReport { trainable: 123_456, total: 134_638_656 };
        assert_eq!(r.to_string(), "trainable params: 123,456 || all params: 134,638,656 || trainable%: 0.0917");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}

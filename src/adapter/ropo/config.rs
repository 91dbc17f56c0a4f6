//! RoPO's hyperparameters ([`RopoConfig`], resolved from the run config's `[adapter]` table,
//! [`crate::config::AdapterSection`], by [`crate::adapter::any::ropo_config`]) and the
//! `adapter_config.json` written next to the weights ([`RopoFileConfig`]).
//!
//! Spec: `../shared/docs/ropo-method.md`, "Options" and "Choices this project makes". Both are
//! strict (`deny_unknown_fields`): they are our own files. The file records every choice the spec
//! leaves open (Givens pairing, reflection order, angle layout) so a saved adapter means one thing;
//! loading refuses a file whose recorded choices differ from this build's.

use serde::{Deserialize, Serialize};

use crate::adapter::targets::TargetModules;
use crate::error::{Error, Result};

/// RoPO hyperparameters (resolved from the run config's `[adapter]` table; also what
/// `adapter_config.json` records, [`RopoFileConfig::adapter_config`]).
///
/// Defaults (spec): `r = 4`, `S = 2`, magnitude on, `q_proj, k_proj, v_proj, o_proj`, seed 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RopoConfig {
    /// Which linears to wrap; see [`TargetModules`].
    pub target_modules: TargetModules,
    /// `r`, the number of Householder reflections; even (paired identity init); 0 = Givens only.
    pub householder_reflections: usize,
    /// `S`, the number of brick-wall Givens stages; 0 = Householder only (HRA with a magnitude).
    pub givens_stages: usize,
    /// Train a per-neuron magnitude `m` (initialized to `rho`).
    pub magnitude: bool,
    /// Seed of the Householder vectors' init (ChaCha20 per layer, see `layer::layer_rng`).
    pub init_seed: u64,
}

impl Default for RopoConfig {
    fn default() -> Self {
        Self {
            target_modules: TargetModules::Names(["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec()),
            householder_reflections: 4,
            givens_stages: 2,
            magnitude: true,
            init_seed: 0,
        }
    }
}

impl RopoConfig {
    /// Check the values; errors name the key: `adapter.householder_reflections must be even (got 3)`.
    pub fn validate(&self) -> Result<()> {
        if self.householder_reflections % 2 != 0 {
            return Err(Error::Config(format!(
                "adapter.householder_reflections must be even (got {}): the identity init pairs the reflections",
                self.householder_reflections
            )));
        }
        if self.householder_reflections == 0 && self.givens_stages == 0 && !self.magnitude {
            return Err(Error::Config(
                "adapter: householder_reflections = 0, givens_stages = 0 and magnitude = false leave nothing to train".into(),
            ));
        }
        match &self.target_modules {
            TargetModules::Names(n) if n.is_empty() => {
                return Err(Error::Config("adapter.target_modules must not be empty".into()))
            }
            TargetModules::Names(n) => {
                if let Some(bad) = n.iter().find(|s| s.is_empty() || s.contains('.')) {
                    return Err(Error::Config(format!(
                        "adapter.target_modules: {bad:?} is not a module name (names match the last path component; use one regex string for paths)"
                    )));
                }
            }
            TargetModules::Regex(_) => {}
        }
        self.target_modules.matcher()?;
        Ok(())
    }
}

/// `adapter_config.json`'s `adapter_type`.
pub const ADAPTER_TYPE: &str = "ROPO";
/// The Givens pairing this build implements (recorded, and checked on load).
pub const GIVENS_PAIRING: &str =
    "brick-wall: stage s (1-based) rotates pairs (p, p+1), p = 0,2,4,... when s is odd, p = 1,3,5,... when s is even; x_p' = cos*x_p - sin*x_q, x_q' = sin*x_p + cos*x_q";
/// The reflection order this build implements (recorded, and checked on load).
pub const REFLECTION_ORDER: &str =
    "R = H_1 ... H_r G_1 ... G_S; on activations R^T x = G_S^T ... G_1^T H_r ... H_1 x (H_1 first)";
/// The tensor layout in `adapter_model.safetensors` (recorded, and checked on load).
pub const TENSOR_LAYOUT: &str = "<module path>.ropo_u (r, d_in): row k = u_{k+1}; <module path>.ropo_theta (A,): all Givens stages' angles concatenated in stage order, angle k of a stage for its k-th pair; <module path>.ropo_magnitude (d_out,): m, W' = diag(m/rho) W R^T, rho = row norms of the base W";

/// `adapter_config.json`: the hyperparameters plus everything needed to give the weights one meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopoFileConfig {
    /// Always [`ADAPTER_TYPE`].
    pub adapter_type: String,
    /// The ropo version that wrote the file.
    pub ropo_version: String,
    /// The base model: HF folder path, hub id or `.gguf` path, as given when training.
    pub base_model: String,
    pub target_modules: TargetModules,
    pub householder_reflections: usize,
    pub givens_stages: usize,
    pub magnitude: bool,
    pub init_seed: u64,
    /// [`GIVENS_PAIRING`].
    pub givens_pairing: String,
    /// [`REFLECTION_ORDER`].
    pub reflection_order: String,
    /// [`TENSOR_LAYOUT`].
    pub conventions: String,
}

impl RopoFileConfig {
    /// The file contents for `cfg` trained on `base_model`.
    pub fn new(cfg: &RopoConfig, base_model: &str) -> Self {
        Self {
            adapter_type: ADAPTER_TYPE.into(),
            ropo_version: env!("CARGO_PKG_VERSION").into(),
            base_model: base_model.into(),
            target_modules: cfg.target_modules.clone(),
            householder_reflections: cfg.householder_reflections,
            givens_stages: cfg.givens_stages,
            magnitude: cfg.magnitude,
            init_seed: cfg.init_seed,
            givens_pairing: GIVENS_PAIRING.into(),
            reflection_order: REFLECTION_ORDER.into(),
            conventions: TENSOR_LAYOUT.into(),
        }
    }

    /// The hyperparameters.
    pub fn adapter_config(&self) -> RopoConfig {
        RopoConfig {
            target_modules: self.target_modules.clone(),
            householder_reflections: self.householder_reflections,
            givens_stages: self.givens_stages,
            magnitude: self.magnitude,
            init_seed: self.init_seed,
        }
    }

    /// Parse `adapter_config.json` text; `path` names the file in errors.
    ///
    /// Errors ([`Error::Input`]): bad JSON or unknown/missing keys (serde's message with line),
    /// another adapter type, recorded conventions that differ from this build's, invalid values.
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self> {
        let f: Self = serde_json::from_str(text)
            .map_err(|e| Error::input(path, Some(e.line()), e.to_string()))?;
        let bad = |field: &str, msg: String| Err(Error::input(path, None, format!("{field}: {msg}")));
        if f.adapter_type != ADAPTER_TYPE {
            return bad("adapter_type", format!("expected {ADAPTER_TYPE:?}, got {:?}", f.adapter_type));
        }
        for (field, got, want) in [
            ("givens_pairing", &f.givens_pairing, GIVENS_PAIRING),
            ("reflection_order", &f.reflection_order, REFLECTION_ORDER),
            ("conventions", &f.conventions, TENSOR_LAYOUT),
        ] {
            if got != want {
                return bad(field, format!("this build implements {want:?}, the file says {got:?}"));
            }
        }
        f.adapter_config().validate().map_err(|e| Error::input(path, None, e.to_string()))?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_spec_and_validate() {
        let c = RopoConfig::default();
        assert_eq!((c.householder_reflections, c.givens_stages, c.magnitude), (4, 2, true));
        c.validate().unwrap();
        let m = c.target_modules.matcher().unwrap();
        assert!(m.is_match("model.layers.0.self_attn.q_proj"));
        assert!(!m.is_match("model.layers.0.mlp.up_proj"));
        assert!(!m.is_match("model.layers.0.self_attn.q_proj_extra"));
    }

    #[test]
    fn validate_names_the_key() {
        let c = RopoConfig { householder_reflections: 3, ..Default::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("adapter.householder_reflections must be even (got 3)"), "{e}");
        let c = RopoConfig { target_modules: TargetModules::Regex("(".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("adapter.target_modules"));
        let c = RopoConfig { target_modules: TargetModules::Names(vec![]), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("adapter.target_modules"));
    }

    #[test]
    fn toml_table_is_strict_and_accepts_both_target_forms() {
        let c: RopoConfig = toml::from_str("householder_reflections = 0\ntarget_modules = 'model\\.layers\\.1\\..*'").unwrap();
        assert_eq!(c.givens_stages, 2);
        let m = c.target_modules.matcher().unwrap();
        assert!(m.is_match("model.layers.1.mlp.down_proj") && !m.is_match("model.layers.10.mlp.down_proj"));
        let c: RopoConfig = toml::from_str("target_modules = ['v_proj']").unwrap();
        assert_eq!(c.target_modules, TargetModules::Names(vec!["v_proj".into()]));
        let e = toml::from_str::<RopoConfig>("householder_reflection = 2").unwrap_err().to_string();
        assert!(e.contains("householder_reflection"), "{e}");
    }

    #[test]
    fn file_round_trips_and_rejects_other_conventions() {
        let f = RopoFileConfig::new(&RopoConfig::default(), "base/model");
        let text = serde_json::to_string_pretty(&f).unwrap();
        let p = std::path::Path::new("x/adapter_config.json");
        assert_eq!(RopoFileConfig::parse(&text, p).unwrap(), f);
        let other = text.replace("H_1 first", "H_r first");
        let e = RopoFileConfig::parse(&other, p).unwrap_err().to_string();
        assert!(e.starts_with("x/adapter_config.json: reflection_order"), "{e}");
        let lora = text.replace("\"ROPO\"", "\"LORA\"");
        assert!(RopoFileConfig::parse(&lora, p).unwrap_err().to_string().contains("adapter_type"));
        let extra = text.replacen('{', "{\"rank\": 8,", 1);
        let e = RopoFileConfig::parse(&extra, p).unwrap_err().to_string();
        assert!(e.contains("rank") && e.starts_with("x/adapter_config.json:1"), "{e}");
    }
}

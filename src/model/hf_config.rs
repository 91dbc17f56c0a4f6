//! A lenient serde mirror of an HF `config.json` (Llama / Mistral / Qwen2 / Qwen3 / Phi-3 /
//! Gemma 2 / Gemma 3 text), resolved once into
//! [`ModelConfig`] by [`HfConfig::into_config`] (candle's two-stage config habit).
//!
//! Unknown keys are ignored (HF configs carry dozens we do not use); never `deny_unknown_fields`.
//! Defaults follow transformers' `LlamaConfig` / `MistralConfig` / `Qwen2Config` / `Qwen3Config` /
//! `Phi3Config` / `Gemma2Config` / `Gemma3TextConfig` (transformers 5.x).
//! Both RoPE spellings are read: the legacy `rope_theta` + `rope_scaling` keys (hub configs
//! written by transformers 4.x) and transformers 5's `rope_parameters` object
//! (`{"rope_type": "default", "rope_theta": ...}`; `configuration_utils.py`,
//! `modeling_rope_utils.py`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::{Activation, Arch, ArchExtras, Llama3RopeScaling, ModelConfig};

/// `eos_token_id` in HF configs: one id or a list of ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"eos_token_id": 2`
    One(u32),
    /// `"eos_token_id": [2, 0]`
    Many(Vec<u32>),
}

impl OneOrMany {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(i) => vec![*i],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// The fields of `config.json` that the Llama family uses; everything optional that HF defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3` or `phi3`; anything else is rejected.
    pub model_type: Option<String>,
    /// Class names (`LlamaForCausalLM`); used when `model_type` is absent.
    pub architectures: Option<Vec<String>>,
    /// V, rows of the embedding (and lm_head) matrix.
    pub vocab_size: usize,
    /// D, the residual width.
    pub hidden_size: usize,
    /// The MLP width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); default = `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; default `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon; default 1e-6 (transformers' default).
    pub rms_norm_eps: Option<f64>,
    /// RoPE base; default `rope_parameters.rope_theta`, else 10000.
    pub rope_theta: Option<f64>,
    /// `null` or a `llama3` scaling object; other kinds are rejected.
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's RoPE object: `rope_type` (`default` or `llama3`, with the llama3
    /// factors) and `rope_theta`; read when `rope_scaling` / `rope_theta` are absent.
    pub rope_parameters: Option<serde_json::Value>,
    /// Qwen2/Qwen3 sliding-window attention switch; `true` is rejected for Qwen3 (not
    /// implemented), released Qwen3 configs have `false`.
    pub use_sliding_window: Option<bool>,
    /// transformers 5's per-layer attention kinds (`full_attention` / `sliding_attention`);
    /// a `sliding_attention` layer is rejected for Qwen3.
    pub layer_types: Option<Vec<String>>,
    /// The attention window of the sliding layers (Gemma: the `sliding_attention` entries of
    /// `layer_types`; Phi-3 and Mistral: every layer). `null` = none; absent: the family's
    /// default (Gemma 2/3 and Mistral 4096, Phi-3 none). Kept as JSON to tell the two apart.
    #[serde(default, deserialize_with = "present")]
    pub sliding_window: Option<serde_json::Value>,
    /// Gemma 3's older spelling of `layer_types`: every `sliding_window_pattern`-th layer is
    /// global, the others slide (default 6).
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3's RoPE base of the sliding layers (older spelling of
    /// `rope_parameters.sliding_attention.rope_theta`; default 10000).
    pub rope_local_base_freq: Option<f64>,
    /// The MLP activation of Llama-style configs (`silu`; anything else is refused).
    pub hidden_act: Option<String>,
    /// Gemma's MLP activation (`gelu_pytorch_tanh`, the default); Gemma2Config and
    /// Gemma3TextConfig read only this key, so a Gemma config's `hidden_act` is ignored.
    pub hidden_activation: Option<String>,
    /// Gemma: the queries' scale is `query_pre_attn_scalar^-1/2` (default 256; must be > 0).
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3 text configs of embedding models (EmbeddingGemma): non-causal attention; `true`
    /// is refused (a causal LM is trained here).
    pub use_bidirectional_attention: Option<bool>,
    /// Gemma 2's attention-score cap (default 50.0; Gemma 3 none); `null` = none.
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<serde_json::Value>,
    /// Gemma 2's logit cap (default 30.0; Gemma 3 none); `null` = none.
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<serde_json::Value>,
    /// Rotated fraction of each head (GPT-NeoX style partial RoPE, also inside
    /// `rope_parameters`); only 1.0 (every dimension rotated) is supported.
    pub partial_rotary_factor: Option<f64>,
    /// Context length.
    pub max_position_embeddings: Option<usize>,
    /// lm_head shares the embedding; default false (LlamaConfig's default).
    pub tie_word_embeddings: Option<bool>,
    /// Biases on q/k/v/o (Llama, Qwen3; default false); Qwen2 always has q/k/v biases.
    pub attention_bias: Option<bool>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<OneOrMany>,
}

/// A key that is present (`null` included) as `Some`, absent as `None` (with `#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// The supported `model_type`s and the `architectures` class names that imply them.
const SUPPORTED: &[(&str, &str, Arch)] = &[
    ("llama", "LlamaForCausalLM", Arch::Llama),
    ("mistral", "MistralForCausalLM", Arch::Mistral),
    ("qwen2", "Qwen2ForCausalLM", Arch::Qwen2),
    ("qwen3", "Qwen3ForCausalLM", Arch::Qwen3),
    ("phi3", "Phi3ForCausalLM", Arch::Phi3),
    ("gemma2", "Gemma2ForCausalLM", Arch::Gemma2),
    ("gemma3_text", "Gemma3ForCausalLM", Arch::Gemma3),
];

/// The HF `model_type` string of `arch` (written back by export).
pub fn model_type(arch: Arch) -> &'static str {
    SUPPORTED.iter().find(|s| s.2 == arch).map(|s| s.0).unwrap_or("llama")
}

/// The HF `architectures` class name of `arch` (written back by export).
pub fn architecture(arch: Arch) -> &'static str {
    SUPPORTED.iter().find(|s| s.2 == arch).map(|s| s.1).unwrap_or("LlamaForCausalLM")
}

impl HfConfig {
    /// Parse `config.json` text; `path` only names the file in errors (`path:line: message`).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::input(path, Some(e.line()), format!("invalid config.json: {e}")))
    }

    /// Read and parse the file at `path`.
    ///
    /// Errors: the file is missing or unreadable, or not a valid config (named with its path).
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::input(path, None, format!("cannot read config.json: {e}")))?;
        Self::parse(&text, path)
    }

    /// Resolve into a [`ModelConfig`] (no `Option`s left). `path` names the file in errors.
    ///
    /// Errors: an unsupported `model_type` (e.g. `gpt_neox`), a rope scaling other than
    /// `llama3` or `linear`, heads that do not divide the width, Qwen3 sliding-window attention,
    /// an activation other than the family's, malformed Gemma keys (named).
    pub fn into_config(self, path: &Path) -> Result<ModelConfig> {
        let err = |msg: String| Error::input(path, None, msg);
        let arch = self.arch().map_err(err)?;
        self.check_heads().map_err(err)?;
        self.check_sliding_window(arch).map_err(err)?;
        self.check_partial_rotary().map_err(err)?;
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let rope = self.rope().map_err(err)?;
        let (default_theta, default_eps, default_max_pos) = match arch {
            Arch::Llama => (10000.0, 1e-6, 2048),
            Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 => (10000.0, 1e-6, 32768),
            Arch::Phi3 => (10000.0, 1e-5, 4096),
            Arch::Gemma2 => (10000.0, 1e-6, 8192),
            Arch::Gemma3 => (1_000_000.0, 1e-6, 131_072),
        };
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(default_max_pos);
        let extras = self.extras(arch, &rope).map_err(err)?;
        Ok(ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads,
            // Gemma2Config / Gemma3TextConfig default head_dim to 256
            head_dim: self.head_dim.unwrap_or(if arch.is_gemma() { 256 } else { self.hidden_size / self.num_attention_heads }),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(default_eps),
            rope_theta: rope.theta.unwrap_or(default_theta),
            rope_scaling: rope.llama3,
            max_position_embeddings,
            // Gemma ties by default, LlamaConfig does not
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(arch.is_gemma()),
            // Qwen2 always has q/k/v biases (its config has no attention_bias key); Phi-3 none.
            attention_bias: arch == Arch::Qwen2 || (arch != Arch::Phi3 && self.attention_bias.unwrap_or(false)),
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.clone().map(|e| e.to_vec()).unwrap_or_default(),
            extras,
        })
    }

    /// The [`ArchExtras`] of `arch`: the activation, Gemma's scalars and caps, the sliding
    /// window and which layers slide, Gemma 3's local RoPE base.
    fn extras(&self, arch: Arch, rope: &Rope) -> std::result::Result<ArchExtras, String> {
        let gemma = arch.is_gemma();
        let act = if gemma { self.hidden_activation.as_ref() } else { self.hidden_act.as_ref() };
        let hidden_act = match act.map(|s| s.as_str()) {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") if gemma => Activation::GeluTanh,
            Some(other) => {
                let (key, want) = if gemma { ("hidden_activation", "gelu_pytorch_tanh") } else { ("hidden_act", "silu") };
                return Err(format!("{key} = \"{other}\": only \"{want}\" is supported for {}", model_type(arch)));
            }
        };
        let nullable = |key: &str, v: &Option<serde_json::Value>, default: Option<f64>| -> std::result::Result<Option<f64>, String> {
            match v {
                None => Ok(default),
                Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x.as_f64().filter(|c| *c > 0.0).map(Some).ok_or_else(|| format!("{key}: expected a positive number or null, got {x}")),
            }
        };
        let positive = |key: &str, x: f64| if x > 0.0 && x.is_finite() { Ok(x) } else { Err(format!("{key}: expected a positive number, got {x}")) };
        if gemma && self.use_bidirectional_attention == Some(true) {
            return Err("use_bidirectional_attention = true: bidirectional (embedding-model) attention is not supported; ropo trains causal language models".into());
        }
        let (attn_cap, final_cap) = if arch == Arch::Gemma2 { (Some(50.0), Some(30.0)) } else { (None, None) };
        let default_window = matches!(arch, Arch::Gemma2 | Arch::Gemma3 | Arch::Mistral).then_some(4096.0);
        // Llama, Qwen2 and Qwen3 ignore the key (Qwen3 refuses sliding layers by use_sliding_window / layer_types)
        let windowed = matches!(arch, Arch::Gemma2 | Arch::Gemma3 | Arch::Mistral | Arch::Phi3);
        let window = if windowed { nullable("sliding_window", &self.sliding_window, default_window)? } else { None };
        if window.is_some_and(|w| w.fract() != 0.0) {
            return Err(format!("sliding_window: expected a whole number of positions, got {}", window.unwrap_or_default()));
        }
        let n = self.num_hidden_layers;
        let sliding_layers: Vec<bool> = match (&self.layer_types, arch) {
            // Qwen3 refuses sliding layers (check_sliding_window); Qwen2's switch is ignored
            (_, Arch::Qwen2 | Arch::Qwen3 | Arch::Llama) => vec![],
            (Some(types), _) => {
                if types.len() != n {
                    return Err(format!("layer_types has {} entries for {n} layers", types.len()));
                }
                types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(format!("layer_types[{i}] = \"{other}\": expected \"sliding_attention\" or \"full_attention\"")),
                    })
                    .collect::<std::result::Result<_, _>>()?
            }
            // Gemma2Config: every other layer slides, from layer 0
            (None, Arch::Gemma2) => (0..n).map(|i| (i + 1) % 2 != 0).collect(),
            (None, Arch::Gemma3) => {
                let p = self.sliding_window_pattern.unwrap_or(6);
                if p == 0 {
                    return Err("sliding_window_pattern: 0".into());
                }
                (0..n).map(|i| (i + 1) % p != 0).collect()
            }
            // Phi-3, Mistral: one window for every layer
            (None, _) => vec![window.is_some(); n],
        };
        let rope_local_theta = match arch {
            Arch::Gemma3 => Some(rope.local_theta.or(self.rope_local_base_freq).unwrap_or(10000.0)),
            _ => None,
        };
        Ok(ArchExtras {
            hidden_act,
            query_pre_attn_scalar: if gemma { Some(positive("query_pre_attn_scalar", self.query_pre_attn_scalar.unwrap_or(256.0))?) } else { None },
            attn_logit_softcapping: if gemma { nullable("attn_logit_softcapping", &self.attn_logit_softcapping, attn_cap)? } else { None },
            final_logit_softcapping: if gemma { nullable("final_logit_softcapping", &self.final_logit_softcapping, final_cap)? } else { None },
            sliding_window: window.map(|w| w as usize).filter(|_| sliding_layers.iter().any(|&s| s)),
            sliding_layers: if sliding_layers.iter().any(|&s| s) { sliding_layers } else { vec![] },
            rope_local_theta,
            rope_linear_factor: rope.linear,
        })
    }

    /// The [`Arch`] of `model_type`, else of the first known `architectures` class name.
    fn arch(&self) -> std::result::Result<Arch, String> {
        let names: Vec<&str> = SUPPORTED.iter().map(|s| s.0).collect();
        match (&self.model_type, &self.architectures) {
            (Some(mt), _) => SUPPORTED
                .iter()
                .find(|s| s.0 == mt)
                .map(|s| s.2)
                .ok_or_else(|| format!("unsupported model_type \"{mt}\" (supported: {})", names.join(", "))),
            (None, Some(archs)) => archs
                .iter()
                .find_map(|a| SUPPORTED.iter().find(|s| s.1 == a).map(|s| s.2))
                .ok_or_else(|| format!("unsupported architectures {archs:?} (supported model_type: {})", names.join(", "))),
            (None, None) => Err("neither model_type nor architectures is set".into()),
        }
    }

    /// Heads that divide the width (unless `head_dim` is given) and kv heads that divide the heads.
    fn check_heads(&self) -> std::result::Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || (self.hidden_size % h != 0 && self.head_dim.is_none()) {
            return Err(format!("hidden_size {} is not a multiple of num_attention_heads {h}", self.hidden_size));
        }
        let hkv = self.num_key_value_heads.unwrap_or(h);
        if hkv == 0 || h % hkv != 0 {
            return Err(format!("num_attention_heads {h} is not a multiple of num_key_value_heads {hkv}"));
        }
        Ok(())
    }

    /// Qwen3 with sliding-window attention (`use_sliding_window = true`, or a
    /// `sliding_attention` entry in `layer_types`) is refused: only full attention is implemented.
    fn check_sliding_window(&self, arch: Arch) -> std::result::Result<(), String> {
        if arch != Arch::Qwen3 {
            return Ok(());
        }
        if self.use_sliding_window == Some(true) {
            return Err("use_sliding_window = true: sliding-window attention is not supported for qwen3 (only full attention; released Qwen3 configs set it to false)".into());
        }
        if let Some(i) = self.layer_types.iter().flatten().position(|t| t != "full_attention") {
            let kind = &self.layer_types.as_ref().expect("position found an entry")[i];
            return Err(format!("layer_types[{i}] = \"{kind}\": only full_attention layers are supported for qwen3"));
        }
        Ok(())
    }

    /// `partial_rotary_factor` (top level or in `rope_parameters`) other than 1.0 is refused.
    fn check_partial_rotary(&self) -> std::result::Result<(), String> {
        let nested = self.rope_parameters.as_ref().and_then(|p| p.get("partial_rotary_factor")).and_then(|f| f.as_f64());
        match self.partial_rotary_factor.or(nested) {
            Some(f) if f != 1.0 => Err(format!("partial_rotary_factor = {f}: only 1.0 (RoPE on every head dimension) is supported")),
            _ => Ok(()),
        }
    }

    /// The RoPE settings from `rope_theta` / `rope_scaling`, falling back to transformers 5's
    /// `rope_parameters` (`rope_type` `default` = no scaling; Gemma 3's is one object per layer
    /// type, `full_attention` and `sliding_attention`).
    fn rope(&self) -> std::result::Result<Rope, String> {
        let all = self.rope_parameters.as_ref().filter(|v| !v.is_null());
        if let Some(p) = all.filter(|p| !p.is_object()) {
            return Err(format!("rope_parameters: expected an object, got {p}"));
        }
        let local = all.and_then(|p| p.get("sliding_attention")).filter(|v| !v.is_null());
        if let Some(kind) = local.and_then(|p| p.get("rope_type")).filter(|k| k.as_str() != Some("default")) {
            return Err(format!("rope_parameters.sliding_attention: rope_type {kind} is not supported (only \"default\" on the sliding layers)"));
        }
        let local_theta = match local.and_then(|p| p.get("rope_theta")) {
            Some(t) => Some(t.as_f64().ok_or_else(|| format!("rope_parameters.sliding_attention: non-numeric \"rope_theta\" {t}"))?),
            None => None,
        };
        let params = all.map(|p| p.get("full_attention").unwrap_or(p)).filter(|v| !v.is_null());
        let theta = match (self.rope_theta, params.and_then(|p| p.get("rope_theta"))) {
            (Some(t), _) => Some(t),
            (None, Some(t)) => Some(t.as_f64().ok_or_else(|| format!("rope_parameters: non-numeric \"rope_theta\" {t}"))?),
            (None, None) => None,
        };
        let scaling = match (&self.rope_scaling, params) {
            (Some(v), _) if !v.is_null() => Some(parse_rope_scaling(v).map_err(|m| format!("rope_scaling: {m}"))?),
            (_, Some(p)) if p.get("rope_type").and_then(|k| k.as_str()).unwrap_or("default") != "default" => {
                Some(parse_rope_scaling(p).map_err(|m| format!("rope_parameters: {m}"))?)
            }
            _ => None,
        };
        let (llama3, linear) = match scaling {
            Some(Scaling::Llama3(s)) => (Some(s), None),
            Some(Scaling::Linear(f)) => (None, Some(f)),
            None => (None, None),
        };
        Ok(Rope { theta, llama3, linear, local_theta })
    }
}

/// The RoPE settings of a config ([`HfConfig::rope`]).
struct Rope {
    theta: Option<f64>,
    llama3: Option<Llama3RopeScaling>,
    /// `rope_type = "linear"`: positions divided by this factor.
    linear: Option<f64>,
    /// Gemma 3's `rope_parameters.sliding_attention.rope_theta`.
    local_theta: Option<f64>,
}

/// A parsed `rope_scaling` object.
enum Scaling {
    Llama3(Llama3RopeScaling),
    Linear(f64),
}

/// `rope_scaling` of type `llama3` or `linear` (keys `rope_type` or the older `type`); other
/// types are errors.
fn parse_rope_scaling(v: &serde_json::Value) -> std::result::Result<Scaling, String> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|k| k.as_str()).unwrap_or("");
    if kind == "default" {
        return Err("rope_type \"default\" with parameters is not supported".into());
    }
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| format!("missing or non-numeric \"{k}\""));
    if kind == "linear" {
        let f = num("factor")?;
        return if f > 0.0 { Ok(Scaling::Linear(f)) } else { Err(format!("linear factor {f}: must be positive")) };
    }
    if kind != "llama3" {
        return Err(format!("unsupported rope_type \"{kind}\" (supported: llama3, linear)"));
    }
    Ok(Scaling::Llama3(Llama3RopeScaling {
        factor: num("factor")?,
        low_freq_factor: num("low_freq_factor")?,
        high_freq_factor: num("high_freq_factor")?,
        original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
    }))
}

/// The `config.json` object HF's `LlamaForCausalLM` (or Mistral/Qwen2) reads back for `cfg`.
pub fn to_json(cfg: &ModelConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": [architecture(cfg.arch)],
        "model_type": model_type(cfg.arch),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    });
    let m = v.as_object_mut().expect("object literal");
    if cfg.arch != Arch::Qwen2 {
        m.insert("attention_bias".into(), cfg.attention_bias.into());
    }
    if cfg.arch == Arch::Phi3 {
        // Phi3Config defaults pad_token_id to 32000, out of range for other vocabularies
        m.insert("pad_token_id".into(), serde_json::Value::Null);
    }
    if cfg.arch == Arch::Qwen3 {
        // full attention in every layer (Qwen3Config: sliding_window is None unless enabled)
        m.insert("use_sliding_window".into(), false.into());
        m.insert("sliding_window".into(), serde_json::Value::Null);
        m.insert("max_window_layers".into(), cfg.num_hidden_layers.into());
    }
    insert_gemma_and_window_keys(m, cfg);
    insert_rope_keys(m, cfg);
    if let Some(b) = cfg.bos_token_id {
        m.insert("bos_token_id".into(), b.into());
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            m.insert("eos_token_id".into(), (*one).into());
        }
        many => {
            m.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    v
}

/// The Gemma keys of [`to_json`] (activation, query scale, soft caps, layer types) and the
/// sliding window of the architectures that have one.
fn insert_gemma_and_window_keys(m: &mut serde_json::Map<String, serde_json::Value>, cfg: &ModelConfig) {
    let x = &cfg.extras;
    if cfg.arch.is_gemma() {
        // Gemma2Config / Gemma3TextConfig read these (transformers 4.4x and 5.x)
        m.remove("hidden_act");
        m.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        // an int in Gemma2Config / Gemma3TextConfig (strictly typed in transformers 5)
        let scalar = x.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64);
        m.insert("query_pre_attn_scalar".into(), if scalar.fract() == 0.0 { (scalar as u64).into() } else { scalar.into() });
        m.insert("attn_logit_softcapping".into(), x.attn_logit_softcapping.into());
        m.insert("final_logit_softcapping".into(), x.final_logit_softcapping.into());
    }
    if matches!(cfg.arch, Arch::Gemma2 | Arch::Gemma3 | Arch::Mistral | Arch::Phi3) {
        m.insert("sliding_window".into(), x.sliding_window.into());
    }
    if cfg.arch.is_gemma() {
        let kinds: Vec<&str> = (0..cfg.num_hidden_layers).map(|i| if x.sliding_layers.get(i).copied().unwrap_or(false) { "sliding_attention" } else { "full_attention" }).collect();
        m.insert("layer_types".into(), kinds.into());
    }
}

/// The RoPE keys of [`to_json`]: Gemma 3's two bases (`rope_parameters`, `rope_local_base_freq`)
/// and `rope_scaling` (Llama 3's, a linear factor, or null).
fn insert_rope_keys(m: &mut serde_json::Map<String, serde_json::Value>, cfg: &ModelConfig) {
    let x = &cfg.extras;
    if let Some(local) = x.rope_local_theta {
        m.insert("rope_local_base_freq".into(), local.into());
        let mut full = serde_json::json!({"rope_type": "default", "rope_theta": cfg.rope_theta});
        if let Some(f) = x.rope_linear_factor {
            full = serde_json::json!({"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": f});
        }
        m.insert("rope_parameters".into(), serde_json::json!({"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}}));
    }
    m.insert(
        "rope_scaling".into(),
        match &cfg.rope_scaling {
            None => x.rope_linear_factor.map_or(serde_json::Value::Null, |f| serde_json::json!({"rope_type": "linear", "factor": f})),
            Some(s) => serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    // SmolLM2-135M-Instruct's config.json (abridged, as published on the hub).
    const SMOLLM2: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
      "is_llama_config": true, "max_position_embeddings": 8192, "model_type": "llama",
      "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": false,
      "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
      "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": true,
      "vocab_size": 49152 }"#;

    #[test]
    fn smollm2_resolves() {
        let c = HfConfig::parse(SMOLLM2, Path::new("config.json")).unwrap().into_config(Path::new("config.json")).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (576, 9, 3, 64));
        assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, 1e-5));
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
    }

    #[test]
    fn gpt_neox_is_rejected_with_the_file_and_type() {
        let text = SMOLLM2.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
        let e = HfConfig::parse(&text, Path::new("m/config.json")).unwrap().into_config(Path::new("m/config.json")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("m/config.json") && s.contains("gpt_neox"), "{s}");
    }

    #[test]
    fn llama3_rope_scaling_and_eos_list() {
        let text = SMOLLM2
            .replace("\"rope_scaling\": null", r#""rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#)
            .replace("\"eos_token_id\": 2", "\"eos_token_id\": [2, 0]");
        let c = HfConfig::parse(&text, Path::new("c")).unwrap().into_config(Path::new("c")).unwrap();
        assert_eq!(c.rope_scaling.as_ref().unwrap().factor, 8.0);
        assert_eq!(c.eos_token_ids, vec![2, 0]);
        // round trip through the exported JSON
        let back = HfConfig::parse(&to_json(&c).to_string(), Path::new("c")).unwrap().into_config(Path::new("c")).unwrap();
        assert_eq!(back, c);
    }

    // Qwen/Qwen3-0.6B's config.json, as published on the hub (transformers 4.51).
    const QWEN3_06B: &str = r#"{
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
      "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
      "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
      "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
      "use_cache": true, "use_sliding_window": false, "vocab_size": 151936 }"#;

    fn resolve(text: &str) -> Result<ModelConfig> {
        HfConfig::parse(text, Path::new("q/config.json"))?.into_config(Path::new("q/config.json"))
    }

    #[test]
    fn qwen3_resolves_with_head_dim_and_round_trips() {
        let c = resolve(QWEN3_06B).unwrap();
        assert_eq!(c.arch, Arch::Qwen3);
        assert!(c.arch.has_qk_norm() && !Arch::Qwen2.has_qk_norm());
        assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (1024, 16, 8, 128));
        assert_eq!((c.rope_theta, c.rms_norm_eps, c.max_position_embeddings), (1e6, 1e-6, 40960));
        assert!(c.tie_word_embeddings && !c.attention_bias);
        let j = to_json(&c);
        assert_eq!((j["model_type"].as_str(), j["architectures"][0].as_str()), (Some("qwen3"), Some("Qwen3ForCausalLM")));
        assert_eq!((j["attention_bias"].as_bool(), j["use_sliding_window"].as_bool()), (Some(false), Some(false)));
        assert_eq!(resolve(&j.to_string()).unwrap(), c);
    }

    /// transformers 5 writes `rope_parameters` instead of `rope_theta` / `rope_scaling`.
    #[test]
    fn rope_parameters_of_transformers_5() {
        let text = QWEN3_06B.replace(r#""rope_scaling": null, "rope_theta": 1000000,"#, r#""rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},"#);
        let c = resolve(&text).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.is_none()), (5e5, true));
        let l3 = r#""rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},"#;
        let c = resolve(&QWEN3_06B.replace(r#""rope_scaling": null, "rope_theta": 1000000,"#, l3)).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.map(|s| s.factor)), (5e5, Some(8.0)));
        let bad = QWEN3_06B.replace(r#""rope_scaling": null, "rope_theta": 1000000,"#, r#""rope_parameters": {"rope_type": "yarn", "factor": 4.0},"#);
        let e = resolve(&bad).unwrap_err().to_string();
        assert!(e.contains("q/config.json") && e.contains("rope_parameters") && e.contains("yarn"), "{e}");
    }

    #[test]
    fn qwen3_sliding_window_is_refused_naming_file_and_key() {
        let e = resolve(&QWEN3_06B.replace(r#""use_sliding_window": false"#, r#""use_sliding_window": true"#)).unwrap_err().to_string();
        assert!(e.contains("q/config.json") && e.contains("use_sliding_window"), "{e}");
        let lt = QWEN3_06B.replace(r#""use_cache": true"#, r#""layer_types": ["full_attention", "sliding_attention"]"#);
        let e = resolve(&lt).unwrap_err().to_string();
        assert!(e.contains("layer_types[1]") && e.contains("sliding_attention"), "{e}");
    }

    // microsoft/Phi-3-mini-4k-instruct's config.json (abridged: auto_map dropped).
    const PHI3_MINI: &str = r#"{
      "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
      "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
      "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
      "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "pad_token_id": 32000,
      "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
      "sliding_window": 2047, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.40.2", "use_cache": true, "vocab_size": 32064 }"#;

    #[test]
    fn phi3_resolves_and_round_trips() {
        let c = resolve(PHI3_MINI).unwrap();
        assert_eq!(c.arch, Arch::Phi3);
        assert!(c.arch.has_fused_projections() && !c.arch.has_qk_norm() && !Arch::Llama.has_fused_projections());
        assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size), (3072, 32, 32, 96, 8192));
        assert_eq!((c.rope_theta, c.rms_norm_eps, c.max_position_embeddings), (1e4, 1e-5, 4096));
        assert!(!c.tie_word_embeddings && !c.attention_bias);
        let j = to_json(&c);
        assert_eq!((j["model_type"].as_str(), j["architectures"][0].as_str()), (Some("phi3"), Some("Phi3ForCausalLM")));
        assert!(j["pad_token_id"].is_null());
        assert_eq!(resolve(&j.to_string()).unwrap(), c);
        // the 128k variants' longrope and a partial rotary factor are refused, naming the key
        let e = resolve(&PHI3_MINI.replace(r#""rope_scaling": null"#, r#""rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}"#)).unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("longrope"), "{e}");
        let e = resolve(&PHI3_MINI.replace(r#""use_cache": true"#, r#""partial_rotary_factor": 0.5"#)).unwrap_err().to_string();
        assert!(e.contains("q/config.json") && e.contains("partial_rotary_factor"), "{e}");
    }

    // google/gemma-2-2b-it's config.json
    const GEMMA2_2B: &str = r#"{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": true, "vocab_size": 256000}"#;

    // google/gemma-3-1b-it's config.json
    const GEMMA3_1B: &str = r#"{"architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106], "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": true, "vocab_size": 262144}"#;

    /// The full-attention layers of a resolved config.
    fn global_layers(c: &ModelConfig) -> Vec<usize> {
        (0..c.num_hidden_layers).filter(|&i| c.extras.window_of(i).is_none()).collect()
    }

    /// Expected values: transformers 5's `Gemma2Config(**json)` / `Gemma3TextConfig(**json)`
    /// (layer_types, sliding_window, rope_parameters, caps, head_dim, tie_word_embeddings).
    #[test]
    fn gemma2_resolves_and_round_trips() {
        let c = resolve(GEMMA2_2B).unwrap();
        assert_eq!(c.arch, Arch::Gemma2);
        assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size), (2304, 8, 4, 256, 9216));
        assert!(c.tie_word_embeddings && c.eos_token_ids == [1, 107]);
        let x = &c.extras;
        assert_eq!(x.hidden_act, Activation::GeluTanh);
        assert_eq!((x.query_pre_attn_scalar, x.attn_logit_softcapping, x.final_logit_softcapping), (Some(256.0), Some(50.0), Some(30.0)));
        assert_eq!(x.sliding_window, Some(4096));
        assert_eq!(global_layers(&c), (0..13).map(|i| 2 * i + 1).collect::<Vec<_>>());
        assert_eq!((x.rope_local_theta, x.rope_linear_factor), (None, None));
        let j = to_json(&c);
        assert_eq!((j["model_type"].as_str(), j["hidden_activation"].as_str()), (Some("gemma2"), Some("gelu_pytorch_tanh")));
        assert_eq!(resolve(&j.to_string()).unwrap(), c);
        // caps set to null switch soft-capping off; an unknown activation is refused by key
        let off = resolve(&GEMMA2_2B.replace(r#""attn_logit_softcapping": 50.0"#, r#""attn_logit_softcapping": null"#)).unwrap();
        assert_eq!((off.extras.attn_logit_softcapping, off.extras.final_logit_softcapping), (None, Some(30.0)));
        let e = resolve(&GEMMA2_2B.replace(r#""hidden_activation": "gelu_pytorch_tanh""#, r#""hidden_activation": "relu""#)).unwrap_err().to_string();
        assert!(e.contains("q/config.json") && e.contains("hidden_activation") && e.contains("relu"), "{e}");
        // Gemma2Config reads hidden_activation only: a stray hidden_act is ignored, as there
        let stray = resolve(&GEMMA2_2B.replace(r#""hidden_act": "gelu_pytorch_tanh""#, r#""hidden_act": "relu""#)).unwrap();
        assert_eq!(stray.extras.hidden_act, Activation::GeluTanh);
        // a scalar that would scale the queries by infinity or NaN is refused by key
        for bad in ["0", "-4"] {
            let e = resolve(&GEMMA2_2B.replace(r#""query_pre_attn_scalar": 256"#, &format!(r#""query_pre_attn_scalar": {bad}"#))).unwrap_err().to_string();
            assert!(e.contains("q/config.json") && e.contains("query_pre_attn_scalar"), "{e}");
        }
    }

    #[test]
    fn gemma3_resolves_and_round_trips() {
        let c = resolve(GEMMA3_1B).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        assert!(c.arch.has_qk_norm() && c.arch.is_gemma());
        assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (1152, 4, 1, 256));
        assert_eq!((c.rope_theta, c.max_position_embeddings), (1e6, 32768));
        assert!(c.tie_word_embeddings);
        let x = &c.extras;
        assert_eq!((x.attn_logit_softcapping, x.final_logit_softcapping, x.query_pre_attn_scalar), (None, None, Some(256.0)));
        assert_eq!((x.sliding_window, x.rope_local_theta, x.rope_linear_factor), (Some(512), Some(1e4), None));
        assert_eq!(global_layers(&c), vec![5, 11, 17, 23]);
        let j = to_json(&c);
        assert_eq!(j["model_type"].as_str(), Some("gemma3_text"));
        assert_eq!(resolve(&j.to_string()).unwrap(), c);
        // the 4B-and-up linear scaling of the global layers
        let lin = resolve(&GEMMA3_1B.replace(r#""rope_scaling": null"#, r#""rope_scaling": {"rope_type": "linear", "factor": 8.0}"#)).unwrap();
        assert_eq!(lin.extras.rope_linear_factor, Some(8.0));
        assert_eq!(resolve(&to_json(&lin).to_string()).unwrap(), lin);
        let e = resolve(&GEMMA3_1B.replace(r#""sliding_window_pattern": 6"#, r#""sliding_window_pattern": 0"#)).unwrap_err().to_string();
        assert!(e.contains("sliding_window_pattern"), "{e}");
        // EmbeddingGemma's bidirectional attention is not a causal LM: refused by key
        let e = resolve(&GEMMA3_1B.replace(r#""use_cache": true"#, r#""use_bidirectional_attention": true"#)).unwrap_err().to_string();
        assert!(e.contains("q/config.json") && e.contains("use_bidirectional_attention"), "{e}");
        // transformers 5's per-kind rope_parameters: the sliding kind's theta is read and checked
        let per_kind = r#""rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}},"#;
        let c = resolve(&GEMMA3_1B.replace(r#""rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000,"#, per_kind)).unwrap();
        assert_eq!((c.rope_theta, c.extras.rope_local_theta), (1e6, Some(2e4)));
        for bad in [r#""rope_type": "default", "rope_theta": "x""#, r#""rope_type": "linear", "factor": 2.0, "rope_theta": 1e4"#] {
            let text = per_kind.replace(r#""rope_type": "default", "rope_theta": 2e4"#, bad);
            let e = resolve(&GEMMA3_1B.replace(r#""rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000,"#, &text)).unwrap_err().to_string();
            assert!(e.contains("rope_parameters.sliding_attention"), "{e}");
        }
    }

    /// Phi-3-mini's window of 2047 applies to every layer (transformers' Phi3 masks with it).
    #[test]
    fn phi3_sliding_window_on_every_layer() {
        let c = resolve(PHI3_MINI).unwrap();
        assert_eq!(c.extras.sliding_window, Some(2047));
        assert!((0..32).all(|i| c.extras.window_of(i) == Some(2047)));
        let none = resolve(&PHI3_MINI.replace(r#""sliding_window": 2047"#, r#""sliding_window": null"#)).unwrap();
        assert!(none.extras.is_default());
        // families that ignore the key load whatever it holds (as transformers does)
        let q = resolve(&QWEN3_06B.replace(r#""sliding_window": null"#, r#""sliding_window": 0"#)).unwrap();
        assert!(q.extras.is_default());
    }

    #[test]
    fn bad_json_names_file_and_line() {
        let e = HfConfig::parse("{\n \"vocab_size\": \"x\"\n}", Path::new("d/config.json")).unwrap_err();
        assert!(e.to_string().starts_with("d/config.json:2:"), "{e}");
    }
}

//! LoRA adapter files in PEFT's layout, so `PeftModel.from_pretrained(base, DIR)` reads what we
//! write and we read what PEFT writes (plain LoRA: no DoRA, rsLoRA, rank/alpha patterns).
//!
//! - `adapter_config.json`: `peft_type "LORA"`, `task_type "CAUSAL_LM"`, `r`, `lora_alpha`,
//!   `lora_dropout`, `target_modules`, `base_model_name_or_path`, `fan_in_fan_out false`,
//!   `bias "none"` and PEFT's other defaults, keys sorted (PEFT writes `sort_keys=True`).
//! - `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight (r, d_in)` and
//!   `….lora_B.weight (d_out, r)` (PEFT's `get_peft_model_state_dict` names), metadata
//!   `format = pt`, the parameters' dtype.
//!
//! Both files are written atomically; loading checks every shape against the model and names
//! the first mismatching key in model order; on error nothing is attached.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{json, Value};

use super::{attach, LoraAdapter, LoraConfig, LoraSet, A_SUFFIX, B_SUFFIX};
use crate::adapter::inject::model_params;
use crate::adapter::targets::{self, TargetModules};
use crate::adapter::{read_config_text, write_folder, StoredTensors};
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// `adapter_config.json`'s `peft_type` for LoRA.
pub const PEFT_TYPE: &str = "LORA";
/// The prefix PEFT puts before a module path in the weights file.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT key of a trainable tensor name (`model.layers.0.self_attn.q_proj.lora_A.weight` ->
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn peft_key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// A number as PEFT writes it: an integer when integral (`16`), else a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The `adapter_config.json` contents for `set`.
pub fn config_json(set: &LoraSet) -> Value {
    let c = &set.config;
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": set.base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": number(c.lora_alpha),
        "lora_dropout": c.lora_dropout,
        "modules_to_save": null,
        "peft_type": PEFT_TYPE,
        "r": c.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": serde_json::to_value(&c.target_modules).expect("TargetModules serializes"),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    })
}

/// Save `set` as a PEFT LoRA adapter folder.
pub fn save(dir: &Path, set: &LoraSet) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = set.vars().into_iter().map(|(n, v)| (peft_key(&n), v.as_tensor().clone())).collect();
    write_folder(dir, &tensors, &config_json(set))
}

/// Parse a PEFT LoRA `adapter_config.json` (`path` names it in errors) into a [`LoraConfig`]
/// (`init_seed` 0) and the base model (`""` when null).
///
/// Unknown keys are accepted (PEFT adds keys across versions); keys that change the math are
/// checked: `fan_in_fan_out` false, `bias` "none", `use_dora`/`use_rslora` false, empty
/// `rank_pattern`/`alpha_pattern`, no `layers_to_transform`, no `modules_to_save`.
/// Errors ([`Error::Input`] naming the file and field): bad JSON, another `peft_type`, a missing
/// or mistyped field, an unsupported option.
pub fn parse_config(text: &str, path: &Path) -> Result<(LoraConfig, String)> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::input(path, Some(e.line()), e.to_string()))?;
    let bad = |field: &str, msg: String| Error::input(path, None, format!("{field}: {msg}"));
    let obj = v.as_object().ok_or_else(|| bad("(top level)", "expected a JSON object".into()))?;
    let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some(PEFT_TYPE) => {}
        other => return Err(bad("peft_type", format!("expected {PEFT_TYPE:?}, got {other:?}"))),
    }
    let r = get("r").and_then(Value::as_u64).filter(|r| *r > 0).ok_or_else(|| bad("r", format!("expected a positive integer, got {:?}", get("r"))))?;
    let lora_alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| *a > 0.0 && a.is_finite())
        .ok_or_else(|| bad("lora_alpha", format!("expected a positive number, got {:?}", get("lora_alpha"))))?;
    let lora_dropout = match get("lora_dropout") {
        None => 0.0,
        Some(x) => x.as_f64().filter(|d| (0.0..1.0).contains(d)).ok_or_else(|| bad("lora_dropout", format!("expected a number in [0, 1), got {x}")))?,
    };
    let target_modules: TargetModules = match get("target_modules") {
        Some(t) => serde_json::from_value(t.clone()).map_err(|e| bad("target_modules", format!("expected a list of names or a regex string: {e}")))?,
        None => return Err(bad("target_modules", "missing".into())),
    };
    target_modules.matcher().map_err(|e| bad("target_modules", e.to_string()))?;
    let is = |k: &str, want: &Value| get(k).is_none_or(|x| x == want);
    let empty = |k: &str| get(k).is_none_or(|x| x.as_object().is_some_and(|o| o.is_empty()) || x.as_array().is_some_and(|a| a.is_empty()));
    for (k, ok, want) in [
        ("fan_in_fan_out", is("fan_in_fan_out", &json!(false)), "false"),
        ("bias", is("bias", &json!("none")), "\"none\""),
        ("use_dora", is("use_dora", &json!(false)), "false"),
        ("use_rslora", is("use_rslora", &json!(false)), "false"),
        ("rank_pattern", empty("rank_pattern"), "empty"),
        ("alpha_pattern", empty("alpha_pattern"), "empty"),
        ("layers_to_transform", get("layers_to_transform").is_none(), "null"),
        ("modules_to_save", empty("modules_to_save"), "null"),
    ] {
        if !ok {
            return Err(bad(k, format!("only {want} is supported (got {})", obj[k])));
        }
    }
    let base = get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("").to_string();
    Ok((LoraConfig { target_modules, r: r as usize, lora_alpha, lora_dropout, init_seed: 0 }, base))
}

/// Attach the PEFT LoRA adapter in `dir` to `linears` (tensors converted to each base weight's
/// dtype and device). On any error nothing is attached.
///
/// Errors: bad config (see [`parse_config`]); a missing tensor ([`Error::MissingTensor`]); a
/// tensor of the wrong shape ([`Error::Shape`] with the PEFT key, the first in model order); a
/// tensor no targeted module uses; no module matched.
pub fn load_linears(dir: &Path, linears: Vec<&mut Linear>, base_params: usize) -> Result<LoraSet> {
    let (cfg_path, text) = read_config_text(dir)?;
    let (cfg, base) = parse_config(&text, &cfg_path)?;
    let mut stored = StoredTensors::read(dir)?;
    let idx = targets::select(&linears, &cfg.target_modules)?;
    let mut built = Vec::with_capacity(idx.len());
    for i in idx {
        let lin = &*linears[i];
        let (n, d) = lin.dims();
        let a = stored.take(peft_key(&format!("{}.{A_SUFFIX}", lin.path)), &[cfg.r, d], lin)?;
        let b = stored.take(peft_key(&format!("{}.{B_SUFFIX}", lin.path)), &[n, cfg.r], lin)?;
        built.push((i, LoraAdapter::from_tensors(lin, a, b, cfg.lora_alpha)?));
    }
    stored.finish()?;
    Ok(attach(linears, built, &cfg, &base, base_params))
}

/// Load the PEFT LoRA adapter in `dir` onto `model`; see [`load_linears`]. Errors also: a tied
/// `lm_head` among the targets. On error the model is unchanged.
pub fn load(dir: &Path, model: &mut Model) -> Result<LoraSet> {
    let (cfg_path, text) = read_config_text(dir)?;
    targets::check_tied(model, &parse_config(&text, &cfg_path)?.0.target_modules)?;
    let base_params = model_params(model);
    load_linears(dir, model.linears_mut(), base_params)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A config as PEFT 0.13 writes it for SmolLM2 (extra keys included).
    const PEFT_WRITTEN: &str = r#"{
  "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
  "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
  "layer_replication": null, "layers_pattern": null, "layers_to_transform": null, "loftq_config": {},
  "lora_alpha": 32, "lora_dropout": 0.05, "megatron_config": null, "megatron_core": "megatron.core",
  "modules_to_save": null, "peft_type": "LORA", "r": 16, "rank_pattern": {}, "revision": null,
  "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false
}"#;

    #[test]
    fn reads_a_peft_written_config() {
        let (c, base) = parse_config(PEFT_WRITTEN, Path::new("a/adapter_config.json")).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (16, 32.0, 0.05));
        assert_eq!(c.target_modules, TargetModules::Names(vec!["v_proj".into(), "q_proj".into()]));
        assert_eq!(base, "HuggingFaceTB/SmolLM2-135M-Instruct");
    }

    #[test]
    fn refuses_options_that_change_the_math() {
        let p = Path::new("a/adapter_config.json");
        for (from, to, field) in [
            ("\"use_dora\": false", "\"use_dora\": true", "use_dora"),
            ("\"use_rslora\": false", "\"use_rslora\": true", "use_rslora"),
            ("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true", "fan_in_fan_out"),
            ("\"bias\": \"none\"", "\"bias\": \"all\"", "bias"),
            ("\"rank_pattern\": {}", "\"rank_pattern\": {\"q_proj\": 4}", "rank_pattern"),
            ("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"", "peft_type"),
            ("\"r\": 16", "\"r\": 0", "r"),
        ] {
            let text = PEFT_WRITTEN.replace(from, to);
            assert_ne!(text, PEFT_WRITTEN);
            let e = parse_config(&text, p).unwrap_err().to_string();
            assert!(e.starts_with(&format!("a/adapter_config.json: {field}:")), "{e}");
        }
        let e = parse_config("{\"peft_type\": \"LORA\",", p).unwrap_err().to_string();
        assert!(e.starts_with("a/adapter_config.json:1:"), "{e}");
    }

    #[test]
    fn written_config_has_peft_fields_and_integral_alpha() {
        assert_eq!(number(16.0), json!(16));
        assert_eq!(number(0.5), json!(0.5));
        assert_eq!(peft_key("model.layers.0.self_attn.q_proj.lora_A.weight"), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    }
}

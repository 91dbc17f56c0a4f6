//! TRL 1.x's loss lists (`loss_type` + `loss_weights`, `sft`), LD-DPO (`ld_alpha`) and WPO
//! (`use_weighting`) against TRL 1.16's own `DPOTrainer._compute_loss`, in float64:
//! tests/fixtures/trl_loss_combos_golden.json, written by scripts/golden_losses.py from fixed
//! policy and reference logits. ropo runs the same logits through its log-prob sums
//! (`seq_logps_from_logits`: the picks, log-softmax and sums the training paths use) and
//! `combined_loss`; the loss, the gradient with respect to every policy logit and TRL's
//! reward metrics must agree to float64 rounding. Also: `rpo_alpha = a` is bit for bit
//! `loss_type = ["sigmoid", "sft"]`, `loss_weights = [1, a]`.

use candle_core::{DType, Device, Tensor, Var};
use ropo::config::RunConfig;
use ropo::logps::{seq_logps_from_logits, split_pairs, LogpOptions, SeqLogps};
use ropo::loss::{combined_loss, LossOutput, LossParams, LossSpec, LossTerm, LossTypes, PairExtras, PairLogps};
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/trl_loss_combos_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reading the golden file")).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

struct Inputs {
    policy: Var,
    reference: Tensor,
    ids: Tensor,
    mask: Tensor,
}

fn inputs(g: &Value) -> Inputs {
    let s: Vec<usize> = g["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let (n, t, v) = (s[0], s[1], s[2]);
    let dev = Device::Cpu;
    let ids: Vec<u32> = g["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    Inputs {
        policy: Var::from_vec(f64s(&g["policy_logits"]), (n, t, v), &dev).unwrap(),
        reference: Tensor::from_vec(f64s(&g["reference_logits"]), (n, t, v), &dev).unwrap(),
        ids: Tensor::from_vec(ids, (n, t), &dev).unwrap(),
        mask: Tensor::from_vec(f64s(&g["completion_mask"]), (n, t), &dev).unwrap(),
    }
}

/// ropo's loss of one golden case, from the logits (as the training step builds it).
fn ropo_loss(inp: &Inputs, spec: &LossSpec, opts: &LogpOptions, p: &LossParams) -> LossOutput {
    let pol: SeqLogps = seq_logps_from_logits(inp.policy.as_tensor(), &inp.ids, &inp.mask, opts).unwrap();
    let rf = seq_logps_from_logits(&inp.reference, &inp.ids, &inp.mask, &opts.reference()).unwrap();
    let (pc, pr) = split_pairs(&pol.logps).unwrap();
    let (rc, rr) = split_pairs(&rf.logps.detach()).unwrap();
    let (nc, nr) = split_pairs(&ropo::logps::completion_token_counts(&inp.mask).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
    let logps = PairLogps { policy_chosen: pc, policy_rejected: pr, reference_chosen: rc, reference_rejected: rr, chosen_tokens: nc, rejected_tokens: nr };
    let extras = PairExtras {
        chosen_unweighted: pol.unweighted.as_ref().map(|u| split_pairs(u).unwrap().0),
        wpo_weights: pol.wpo_weights.as_ref().map(|w| split_pairs(w).unwrap()),
    };
    combined_loss(spec, &logps, &extras, p).unwrap()
}

fn case_spec(c: &Value) -> (LossSpec, LogpOptions, f64) {
    let types: LossTypes = serde_json::from_value(c["loss_type"].clone()).unwrap();
    let weights = c["loss_weights"].as_array().map(|w| w.iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>());
    let wpo = c["use_weighting"].as_bool().unwrap();
    let spec = LossSpec::from_training(&types, weights.as_deref(), None, wpo);
    (spec, LogpOptions { ld_alpha: c["ld_alpha"].as_f64(), use_weighting: wpo }, c["label_smoothing"].as_f64().unwrap())
}

// Every case of the golden file: loss to 1e-12 relative, each of the N·T·V logit gradients to
// 1e-12 absolute (they are O(1e-2) or less; the sums run in another order than torch's), the
// rewards/* and logps/* metrics to 1e-12 (the accuracy to 1e-7: TRL averages it in float32). A wrong formula or a missed token is off by > 1e-4.
#[test]
fn loss_lists_ld_dpo_and_wpo_match_trl() {
    let g = golden();
    assert!(g["source"].as_str().unwrap().starts_with("trl 1.16"), "{}", g["source"]);
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let inp = inputs(&g);
        let (spec, opts, eps) = case_spec(c);
        let p = LossParams { beta: g["beta"].as_f64().unwrap(), label_smoothing: eps, discopop_tau: g["discopop_tau"].as_f64().unwrap() };
        let out = ropo_loss(&inp, &spec, &opts, &p);
        let got = out.loss.to_scalar::<f64>().unwrap();
        let want = c["loss"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "{name}: loss {got} vs TRL {want}");
        let grad = out.loss.backward().unwrap().get(inp.policy.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want_g = f64s(&c["grad_policy_logits"]);
        assert_eq!(grad.len(), want_g.len());
        let mut nonzero = 0;
        for (i, (a, b)) in grad.iter().zip(&want_g).enumerate() {
            assert!((a - b).abs() <= 1e-12, "{name}: d loss / d logit[{i}] {a} vs TRL {b}");
            nonzero += usize::from(b.abs() > 1e-9);
        }
        assert!(nonzero > 20, "{name}: the case must exercise real gradients ({nonzero})");
        let m = c["metrics"].as_object().unwrap();
        for (k, v) in out.metrics.named() {
            if let Some(w) = m.get(k) {
                // TRL takes the accuracy's mean in float32 (`.float()`)
                let tol = if k == "rewards/accuracies" { 1e-7 } else { 1e-12 };
                assert!((v - w.as_f64().unwrap()).abs() <= tol, "{name}: {k} {v} vs TRL {w}");
            }
        }
        assert_eq!(out.terms.len(), spec.terms.len(), "{name}: one metric per term");
    }
}

// rpo_alpha = a is the list ["sigmoid", "sft"] with weights [1, a]: the same spec from the
// config, and the same bits for the loss and every gradient.
#[test]
fn rpo_alpha_is_the_sft_term_bit_for_bit() {
    let base = "[model]\npath_or_id = \"M\"\n[data]\ntrain_files = [\"T\"]\n[training]\n";
    let load = |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        RunConfig::load(Some(&path), &[]).unwrap()
    };
    let a = 0.37;
    let by_alpha = load(&format!("rpo_alpha = {a}\n"));
    let by_list = load(&format!("loss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0, {a}]\n"));
    assert_eq!(by_alpha.training.loss_spec(), by_list.training.loss_spec());
    assert_eq!(by_list.training.loss_spec().terms[1], (LossTerm::Sft, a));
    let g = golden();
    for opts in [LogpOptions::default(), LogpOptions { ld_alpha: Some(0.5), use_weighting: false }] {
        let runs: Vec<(u64, Vec<u64>)> = [&by_alpha, &by_list]
            .iter()
            .map(|cfg| {
                let inp = inputs(&g);
                let out = ropo_loss(&inp, &cfg.training.loss_spec(), &opts, &cfg.training.loss_params());
                let grad = out.loss.backward().unwrap().get(inp.policy.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                (out.loss.to_scalar::<f64>().unwrap().to_bits(), grad.iter().map(|x| x.to_bits()).collect())
            })
            .collect();
        assert_eq!(runs[0], runs[1], "rpo_alpha vs loss list ({opts:?})");
    }
}

// The config: a list with weights of another length, ld_alpha out of [0, 1], WPO with AOT or
// with sft, and an unknown name in a list are errors naming the key; a string stays a string.
#[test]
fn loss_list_config_errors() {
    let base = "[model]\npath_or_id = \"M\"\n[data]\ntrain_files = [\"T\"]\n[training]\n";
    let err = |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        RunConfig::load(Some(&path), &[]).unwrap_err().to_string()
    };
    let e = err("loss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0]\n");
    assert!(e.contains("training.loss_weights must have one weight per loss_type entry (1 weights for 2 loss types)"), "{e}");
    let e = err("ld_alpha = 1.5\n");
    assert!(e.contains("training.ld_alpha must be in [0, 1] (got 1.5)"), "{e}");
    let e = err("loss_type = [\"aot\"]\nuse_weighting = true\n");
    assert!(e.contains("training.use_weighting does not apply to loss_type \"aot\""), "{e}");
    let e = err("loss_type = [\"sigmoid\", \"sft\"]\nuse_weighting = true\n");
    assert!(e.contains("training.use_weighting with an \"sft\" term"), "{e}");
    let e = err("rpo_alpha = 1.0\nuse_weighting = true\n");
    assert!(e.contains("training.use_weighting with an \"sft\" term"), "{e}");
    let e = err("loss_type = [\"sigmoid\", \"dpo\"]\n");
    assert!(e.contains("run.toml:6") && e.contains("unknown loss type \"dpo\"") && e.contains("\"sft\""), "{e}");
    let e = err("loss_type = [\"sigmoid\", \"robust\"]\nlabel_smoothing = 0.6\n");
    assert!(e.contains("training.label_smoothing must be in [0, 0.5) for loss_type \"robust\""), "{e}");
    let e = err("loss_type = \"sft\"\nlabel_smoothing = 0.1\n");
    assert!(e.contains("training.label_smoothing must be 0 for loss_type \"sft\""), "{e}");
    // printed back: one name as a string, a list as a list
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, format!("{base}loss_type = [\"sigmoid\", \"bco_pair\", \"sft\"]\nloss_weights = [0.8, 0.2, 1.0]\n")).unwrap();
    let cfg = RunConfig::load(Some(&path), &[]).unwrap();
    let text = cfg.to_toml_string();
    assert!(text.contains("loss_type = [\"sigmoid\", \"bco_pair\", \"sft\"]"), "{text}");
    assert!(RunConfig::default().to_toml_string().contains("loss_type = \"sigmoid\""));
}

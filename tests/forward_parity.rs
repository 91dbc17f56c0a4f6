//! Forward parity on the real model: SmolLM2-135M-Instruct loaded from its GGUF (dequantized to
//! f32, Q/K un-permuted) gives the per-position next-token log-probs of transformers' f32
//! forward over the same dequantized weights (../shared/golden/smollm2_golden.json `logprobs.*`,
//! made by anchors/make_golden.py), and the same top-5 next tokens at the last position.
//!
//! Tolerance 2e-3 absolute (the acceptance bound): f32 summation order differs between
//! candle's gemm and torch's; the golden file's own numpy-vs-torch cross-check differs by ~1e-4
//! in logits.

mod common;

use candle_core::{Tensor, D};
use ropo::model::load;

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn next_token_logprobs_match_golden() {
    let g = common::golden("smollm2_golden.json");
    let gguf = common::smollm2_gguf();
    let lm = load(gguf.to_str().unwrap(), &common::load_options()).unwrap();
    let cases = g["logprobs"].as_object().unwrap();
    assert_eq!(cases.len(), 2);
    for (name, case) in cases {
        let ids = u32s(&case["ids"]);
        let want: Vec<f64> = case["next_token_logprob"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(want.len(), ids.len() - 1);
        let input = Tensor::new(ids.as_slice(), &common::test_device()).unwrap().unsqueeze(0).unwrap();
        let logits = lm.model.forward(&input, None, false).unwrap().squeeze(0).unwrap(); // (T, V)
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let rows: Vec<Vec<f32>> = logp.to_vec2().unwrap();
        let mut max_err = 0f64;
        for t in 0..ids.len() - 1 {
            let got = rows[t][ids[t + 1] as usize] as f64;
            let err = (got - want[t]).abs();
            max_err = max_err.max(err);
            assert!(err < 2e-3, "{name} position {t}: {got} vs golden {}", want[t]);
        }
        eprintln!("{name}: max |logprob - golden| = {max_err:.2e} over {} positions", want.len());
        // top-5 at the last position
        let last = &rows[ids.len() - 1];
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(top5, u32s(&case["last_position_top5_ids"]), "{name} top-5");
        // and the raw logits of the last position (first 8 entries)
        let first8: Vec<f32> = logits.get(ids.len() - 1).unwrap().narrow(0, 0, 8).unwrap().to_vec1().unwrap();
        for (i, (a, b)) in first8.iter().zip(case["last_position_logits_first8"].as_array().unwrap()).enumerate() {
            let b = b.as_f64().unwrap();
            assert!((*a as f64 - b).abs() < 2e-3, "{name} logit {i}: {a} vs {b}");
        }
    }
}

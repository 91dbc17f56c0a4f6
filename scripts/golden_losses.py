#!/usr/bin/env python3
"""Golden values of TRL 1.x's loss lists, LD-DPO and WPO, from TRL's own code, in float64.

Runs `trl.DPOTrainer._compute_loss` (TRL 1.16) itself on fixed logits: the policy and the
reference are stubs answering TRL's fused-LM-head call with per-token log-probs from TRL's
`selective_log_softmax` (and WPO's `log_sum_sq_probs`) in float64 (see StubLM), so TRL's
LD-DPO sums, WPO weights, loss loop and metrics produce the numbers. The gradient is taken
with respect to the policy logits. Writes
tests/fixtures/trl_loss_combos_golden.json (read by tests/loss_combos.rs).

    ~/.cache/ropo/anchor/venv/bin/python scripts/golden_losses.py    # the venv of scripts/anchor_compare.sh
"""
import json
import os
import sys
import types
from collections import defaultdict

import torch
import trl
from torch import nn
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "trl_loss_combos_golden.json")

B, T, V = 3, 7, 11
BETA = 0.1
# (name, loss_type, loss_weights, ld_alpha, use_weighting, label_smoothing)
CASES = [
    ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], None, False, 0.0),
    ("sigmoid_sft", ["sigmoid", "sft"], [1.0, 0.5], None, False, 0.0),
    ("sft_only", ["sft"], None, None, False, 0.0),
    ("hinge_nca_default_weights", ["hinge", "nca_pair"], None, None, False, 0.0),
    ("ld_sigmoid", ["sigmoid"], None, 0.5, False, 0.0),
    ("ld_zero_ipo", ["ipo"], None, 0.0, False, 0.0),
    ("wpo_sigmoid", ["sigmoid"], None, None, True, 0.0),
    ("ld_sigmoid_sft", ["sigmoid", "sft"], [1.0, 0.7], 0.4, False, 0.0),
    ("ld_wpo_robust_bco", ["robust", "bco_pair"], [1.0, 0.3], 0.3, True, 0.1),
]
# Not covered: "sft" with use_weighting; TRL 1.16 raises on it (its in-place `*=` on the expanded sft
# tensor), so ropo refuses that combination as a config error.


class StubLM(nn.Module):
    """A policy or reference whose logits are fixed, answering TRL's fused-head call in float64.

    `model(..., labels=labels, fused_lm_head=True)` returns what TRL's `add_fused_lm_head`
    returns (a `FusedCausalLMOutput` of per-token fields, zero where the next label is -100),
    computed by TRL's `selective_log_softmax` and the kernel's `log_sum_sq_probs` formula in
    float64: TRL's own fused kernel accumulates in float32, which would cap the golden at ~1e-7.
    """

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.is_gradient_checkpointing = False

    def forward(self, *args, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head
        z = self.logits[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        log_probs = selective_log_softmax(z, target.clamp(min=0)).masked_fill(~mask, 0.0)
        lsq = (torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1)).masked_fill(~mask, 0.0)
        mean_logits = z.mean(-1).masked_fill(~mask, 0.0)
        p = torch.softmax(z, -1)
        entropy = (-(p * torch.log_softmax(z, -1)).sum(-1)).masked_fill(~mask, 0.0)
        is_top1 = (z.argmax(-1) == target) & mask
        return FusedCausalLMOutput(loss=None, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=lsq, mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)


def fake_trainer(policy, ref, case):
    _, loss_type, weights, ld_alpha, use_weighting, eps = case
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x, unwrap_model=lambda m: m)
    args = types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None, gradient_checkpointing=False)
    return types.SimpleNamespace(
        model=policy, ref_model=ref, accelerator=acc, args=args, aux_loss_enabled=False, precompute_ref_logps=False,
        beta=BETA, loss_types=loss_type, loss_weights=weights or [1.0] * len(loss_type), ld_alpha=ld_alpha,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, label_smoothing=eps, use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )


def inputs():
    g = torch.Generator().manual_seed(18)
    policy_logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64) * 2.0
    ref_logits = policy_logits + 0.3 * torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    # prompt lengths 2, 3, 1 (shared by each pair); completion lengths differ within each pair; padding after
    cm = torch.zeros(2 * B, T, dtype=torch.int64)
    spans = [(2, 4), (3, 3), (1, 6), (2, 2), (3, 4), (1, 3)]  # (prompt, completion) of rows c0 c1 c2 r0 r1 r2
    for row, (p, c) in enumerate(spans):
        cm[row, p : p + c] = 1
    am = torch.zeros_like(cm)
    for row, (p, c) in enumerate(spans):
        am[row, : p + c] = 1
    return policy_logits, ref_logits, ids, cm, am


def run_case(case, policy_logits, ref_logits, ids, cm, am):
    hidden = policy_logits.clone().requires_grad_(True)
    policy, ref = StubLM(hidden), StubLM(ref_logits.clone())
    policy.train()
    fake = fake_trainer(policy, ref, case)
    loss = DPOTrainer._compute_loss(fake, policy, {"input_ids": ids, "attention_mask": am, "completion_mask": cm}, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    name, loss_type, weights, ld_alpha, use_weighting, eps = case
    return {
        "name": name, "loss_type": loss_type, "loss_weights": weights, "ld_alpha": ld_alpha, "use_weighting": use_weighting,
        "label_smoothing": eps, "loss": loss.item(), "grad_policy_logits": hidden.grad.flatten().tolist(), "metrics": metrics,
    }


def main():
    torch.set_default_dtype(torch.float64)
    policy_logits, ref_logits, ids, cm, am = inputs()
    cases = [run_case(c, policy_logits, ref_logits, ids, cm, am) for c in CASES]
    out = {
        "source": f"trl {trl.__version__} DPOTrainer._compute_loss, torch {torch.__version__}, float64 (scripts/golden_losses.py)",
        "beta": BETA, "discopop_tau": 0.05, "shape": [2 * B, T, V],
        "policy_logits": policy_logits.flatten().tolist(), "reference_logits": ref_logits.flatten().tolist(),
        "input_ids": ids.flatten().tolist(), "completion_mask": cm.flatten().tolist(), "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(OUT + ".tmp", OUT)
    for c in cases:
        print(f"{c['name']:28s} loss {c['loss']:.15f}", file=sys.stderr)


if __name__ == "__main__":
    main()

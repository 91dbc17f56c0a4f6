#!/usr/bin/env python3
"""The comparison table of scripts/compare.sh: one row per variant, from the files it wrote.

    python3 scripts/compare_table.py runs/compare ropo,lora,full

Reads <out>/base/report.json (`ropo eval`, no adapter), and per variant <out>/<v>/report.json
(`ropo eval --adapter --energy`) and <out>/<v>/train.log (`ropo train`'s stderr: trainable
parameters, wall time, tokens/s, peak RSS). Writes <out>/table.md and <out>/table.json.
"""
import json
import re
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def train_facts(log_path):
    text = open(log_path).read()
    facts = {}
    m = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", text)
    if m:
        facts["trainable"] = int(m.group(1).replace(",", ""))
        facts["all_params"] = int(m.group(2).replace(",", ""))
    m = re.search(r"done: (\d+) steps in ([\d.]+) s .*?, ([\d.]+) real tokens/s, peak RSS ([\d.]+) GiB", text)
    if m:
        facts["steps"] = int(m.group(1))
        facts["wall_seconds"] = float(m.group(2))
        facts["tokens_per_second"] = float(m.group(3))
        facts["peak_rss_gib"] = float(m.group(4))
    return facts


def row(name, model_report, energy, facts, base):
    p = model_report.get("preference", {})
    g = model_report.get("greedy", {})
    s = model_report.get("sampled", {})
    m = model_report.get("mmlu", {}).get("overall", {})
    bg = base.get("greedy", {})
    bm = base.get("mmlu", {}).get("overall", {})
    r = {
        "variant": name,
        "trainable": facts.get("trainable"),
        "trainable_pct": 100.0 * facts["trainable"] / facts["all_params"] if "trainable" in facts else None,
        "rewards/accuracies": p.get("rewards/accuracies"),
        "rewards/margins": p.get("rewards/margins"),
        "eval_loss": p.get("loss"),
        "logps/chosen": p.get("logps/chosen"),
        "logps/rejected": p.get("logps/rejected"),
        "greedy/mean_length": g.get("mean_length"),
        "greedy/length_ratio": g["mean_length"] / bg["mean_length"] if g and bg and bg.get("mean_length") else None,
        "greedy/distinct_2": g.get("distinct_2"),
        "greedy/repeated_4gram_rate": g.get("repeated_4gram_rate"),
        "sampled/mean_length": s.get("mean_length"),
        "sampled/distinct_2": s.get("distinct_2"),
        "mmlu/accuracy": m.get("accuracy"),
        "mmlu/logprob_correct": m.get("mean_logprob_correct"),
        "mmlu/logprob_change": (m["mean_logprob_correct"] - bm["mean_logprob_correct"]) if m and bm else None,
        "energy/mean_relative_change": energy.get("mean_relative_change") if energy else None,
        "energy/max_abs_relative_change": energy.get("max_abs_relative_change") if energy else None,
        "wall_seconds": facts.get("wall_seconds"),
        "tokens_per_second": facts.get("tokens_per_second"),
        "peak_rss_gib": facts.get("peak_rss_gib"),
    }
    return r


def fmt(v, spec):
    if v is None:
        return "-"
    return format(v, spec)


COLUMNS = [
    ("variant", "variant", "s"),
    ("trainable", "trainable", ","),
    ("trainable_pct", "%", ".2f"),
    ("rewards/accuracies", "held-out acc.", ".3f"),
    ("rewards/margins", "margins", ".3f"),
    ("eval_loss", "DPO loss", ".4f"),
    ("logps/chosen", "logps/chosen", ".1f"),
    ("greedy/mean_length", "gen. length", ".1f"),
    ("greedy/length_ratio", "length / base", ".2f"),
    ("greedy/distinct_2", "distinct-2", ".3f"),
    ("greedy/repeated_4gram_rate", "rep. 4-gram", ".3f"),
    ("mmlu/accuracy", "MMLU acc.", ".3f"),
    ("mmlu/logprob_change", "MMLU logp change", "+.4f"),
    ("energy/mean_relative_change", "HE change", "+.2e"),
    ("wall_seconds", "train s", ".0f"),
    ("tokens_per_second", "tok/s", ".0f"),
    ("peak_rss_gib", "peak RSS GiB", ".2f"),
]


def main():
    out, variants = sys.argv[1], sys.argv[2].split(",")
    base = load(f"{out}/base/report.json")["base"]
    rows = [row("base", base, None, {}, base)]
    for v in variants:
        rep = load(f"{out}/{v}/report.json")
        rows.append(row(v, rep["adapted"], rep.get("energy"), train_facts(f"{out}/{v}/train.log"), base))
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k], spec) for k, _, spec in COLUMNS) + " |")
    md = "\n".join(lines) + "\n"
    notes = (
        "\nHeld-out: the last 84 rows of orca_dpo_pairs (pairs whose prompt fits max_length 256); the base model"
        " is the reference, so its rewards are 0 and its accuracy 0. Generations: greedy, first prompts of"
        " the held-out file. MMLU: zero-shot accuracy, and the mean log-likelihood of the correct letter,"
        " change against the base. HE change: mean relative change of the hyperspherical energy of the adapted layers.\n"
    )
    with open(f"{out}/table.md", "w") as f:
        f.write(md + notes)
    with open(f"{out}/table.json", "w") as f:
        json.dump(rows, f, indent=2)
    print(md + notes)


if __name__ == "__main__":
    main()

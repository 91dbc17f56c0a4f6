#!/usr/bin/env python3
"""A sweep: adapter variants x learning rates, same data, steps and seed; every run trained with
`ropo train`, evaluated with the same `ropo eval` settings, then one table (results.md +
results.json) and one picture (sweep.png: held-out accuracy and margin, length ratio and
distinct-2 against the KL drift from the reference, one line per method).

    python3 scripts/sweep.py sweeps/orca.toml            # the whole grid (resumes)
    python3 scripts/sweep.py sweeps/orca.toml --only ropo,lora   # train only these; the table
                                                         # has every finished run
    python3 scripts/sweep.py sweeps/orca.toml --dry-run  # print the commands

The sweep continues where it stopped: a run with its eval.json is done and skipped; a run with
checkpoints resumes (`ropo train --resume`); a run folder without either starts again
(`--overwrite`). So a long sweep can run in parts. Only the Python standard library is used
(3.11+: tomllib).

The sweep file (TOML):

    base = "configs/compare/ropo.toml"     # the run config every variant starts from
    output_dir = "runs/sweep/orca"
    learning_rates = [2e-4, 5e-4, 2e-3]   # for variants that name none
    set = []                               # --set overrides for every run (e.g. max_steps)

    [eval]                                 # one ropo eval per run (and once for the base model)
    prompts = "../shared/data/orca_dpo_pairs/validation.jsonl"
    prompt_rows = "-84:"                   # held-out rows only: prompts training never saw
    samples = 16
    max_new_tokens = 64
    mmlu = "../shared/data/mmlu"           # optional: MMLU in cloze form
    subjects = ["global_facts", "astronomy"]
    mmlu_limit = 40

    [[variant]]
    name = "ropo"
    set = []                               # --set overrides of this variant
    # base = "configs/compare/lora.toml"   # optional: another run config
    # learning_rates = [...]               # optional
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tomllib


def fail(msg):
    print(f"sweep: {msg}", file=sys.stderr)
    sys.exit(2)


def row_slice(rows, spec):
    a, _, b = spec.partition(":")
    return rows[slice(int(a) if a.strip() else None, int(b) if b.strip() else None)]


def run(cmd, dry):
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if not dry:
        r = subprocess.run(cmd)
        if r.returncode != 0:
            fail(f"command failed with exit code {r.returncode}: {cmd[0]} {cmd[1]}")


def lr_name(lr):
    return f"lr{lr:.0e}".replace("e-0", "e-")


def read_sweep(path):
    try:
        with open(path, "rb") as f:
            s = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        fail(f"{path}: {e}")
    for key in ["base", "output_dir", "variant", "eval"]:
        if key not in s:
            fail(f"{path}: missing key {key!r}")
    names = [v.get("name") for v in s["variant"]]
    if None in names or len(set(names)) != len(names):
        fail(f"{path}: every [[variant]] needs a unique name (got {names})")
    for key in ["prompts"]:
        if key not in s["eval"]:
            fail(f"{path}: [eval] misses {key!r}")
    return s


def model_of(config):
    with open(config, "rb") as f:
        return tomllib.load(f)["model"]["path_or_id"]


def eval_args(ev, prompts_file):
    args = ["--prompts", prompts_file, "--samples", str(ev.get("samples", 16)),
            "--max-new-tokens", str(ev.get("max_new_tokens", 64)), "--drift"]
    if "mmlu" in ev:
        args += ["--mmlu", ev["mmlu"], "--subjects", ",".join(ev["subjects"]), "--mmlu-format", "cloze", "--shots", "0"]
        if "mmlu_limit" in ev:
            args += ["--mmlu-limit", str(ev["mmlu_limit"])]
    return args


def final_eval(metrics):
    last = None
    with open(metrics) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if "eval/rewards/accuracies" in r:
                    last = r
    if last is None:
        fail(f"{metrics}: no evaluation record (set data.eval_rows or eval_split in the run config)")
    return last


def summary(variant, lr, run_dir, base):
    ev = final_eval(os.path.join(run_dir, "metrics.jsonl"))
    with open(os.path.join(run_dir, "eval.json")) as f:
        rep = json.load(f)["adapted"]
    out = {
        "method": variant, "learning_rate": lr, "run": run_dir,
        "drift_kl": rep["drift"]["kl"], "drift_nll": rep["drift"]["nll_policy"],
        "eval_accuracy": ev["eval/rewards/accuracies"], "eval_margins": ev["eval/rewards/margins"],
        "eval_loss": ev["eval/loss"],
        "length_ratio": rep["greedy"]["mean_length"] / max(base["greedy"]["mean_length"], 1e-9),
        "distinct_2": rep["sampled"]["distinct_2"],
    }
    if "mmlu" in rep:
        m = rep["mmlu"]["overall"]
        out["mmlu_cloze_accuracy"] = m["accuracy"]
        out["mmlu_cloze_logprob_correct"] = m["mean_logprob_correct"]
    return out


def table(runs, base):
    cols = ["method", "learning_rate", "eval_accuracy", "eval_margins", "drift_kl", "drift_nll", "length_ratio",
            "distinct_2", "mmlu_cloze_accuracy", "mmlu_cloze_logprob_correct"]
    cols = [c for c in cols if any(c in r for r in runs)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    def fmt(c, v):
        if not isinstance(v, float):
            return str(v)
        if c == "learning_rate":
            return f"{v:.0e}"
        # under 0.01 (a KL of a barely moved run): significant digits, not a learning rate's look
        return f"{v:.2g}" if 0 < abs(v) < 1e-2 else f"{v:.4f}"
    b = {"method": "base", "learning_rate": "-", "drift_kl": 0.0, "drift_nll": base["drift"]["nll_policy"], "length_ratio": 1.0,
         "distinct_2": base["sampled"]["distinct_2"]}
    if "mmlu" in base:
        b["mmlu_cloze_accuracy"] = base["mmlu"]["overall"]["accuracy"]
        b["mmlu_cloze_logprob_correct"] = base["mmlu"]["overall"]["mean_logprob_correct"]
    for r in [b] + runs:
        lines.append("| " + " | ".join(fmt(c, r.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep")
    ap.add_argument("--only", help="comma-separated variant names")
    ap.add_argument("--ropo", default=os.environ.get("ROPO", "target/release/ropo"))
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    s = read_sweep(a.sweep)
    only = set(a.only.split(",")) if a.only else None
    if only and not only <= {v["name"] for v in s["variant"]}:
        fail(f"--only names unknown variants: {sorted(only - {v['name'] for v in s['variant']})}")
    out = s["output_dir"]
    os.makedirs(out, exist_ok=True)
    ev = s["eval"]
    with open(ev["prompts"]) as f:
        rows = [l for l in f if l.strip()]
    prompts_file = os.path.join(out, "prompts.jsonl")
    with open(prompts_file, "w") as f:
        f.writelines(row_slice(rows, ev.get("prompt_rows", ":")))
    model = model_of(s["base"])

    base_dir = os.path.join(out, "base")
    if not os.path.exists(os.path.join(base_dir, "eval.json")):
        os.makedirs(base_dir, exist_ok=True)
        run([a.ropo, "eval", "--model", model] + eval_args(ev, prompts_file)
            + ["--out", os.path.join(base_dir, "eval.json"), "--generations", os.path.join(base_dir, "generations.jsonl")], a.dry_run)

    done = []
    for v in s["variant"]:
        for lr in v.get("learning_rates", s.get("learning_rates", [])):
            run_dir = os.path.join(out, v["name"], lr_name(lr))
            if os.path.exists(os.path.join(run_dir, "eval.json")):
                print(f"= {run_dir}: done", flush=True)
                done.append((v["name"], lr, run_dir))
                continue
            # --only limits what is trained; every finished run of the grid is tabulated
            if only and v["name"] not in only:
                continue
            sets = s.get("set", []) + v.get("set", []) + [f"training.learning_rate={lr!r}", f"training.output_dir={json.dumps(run_dir)}"]
            cmd = [a.ropo, "train", "--config", v.get("base", s["base"])]
            for x in sets:
                cmd += ["--set", x]
            if os.path.isdir(os.path.join(run_dir, "checkpoints")) and not os.path.exists(os.path.join(run_dir, "adapter_config.json")):
                cmd.append("--resume")
            elif os.path.exists(run_dir):
                cmd.append("--overwrite")
            if not os.path.exists(os.path.join(run_dir, "adapter_config.json")):
                run(cmd, a.dry_run)
            run([a.ropo, "eval", "--model", model, "--adapter", run_dir] + eval_args(ev, prompts_file)
                + ["--out", os.path.join(run_dir, "eval.json"), "--generations", os.path.join(run_dir, "generations.jsonl")], a.dry_run)
            done.append((v["name"], lr, run_dir))
    if a.dry_run:
        return
    with open(os.path.join(base_dir, "eval.json")) as f:
        base = json.load(f)["base"]
    runs = [summary(name, lr, d, base) for name, lr, d in done]
    results = {"sweep": a.sweep, "base": base, "runs": runs}
    tmp = os.path.join(out, ".results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(runs, base))
    run([a.ropo, "plot", "--sweep", os.path.join(out, "results.json"), "--out", os.path.join(out, "sweep.png")], False)
    print(table(runs, base))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Table of scripts/anchor_compare.sh: TRL + PEFT vs ropo, median real tokens/s of steps 2-6
and peak RSS of each run, and each ropo run's ratios against the fastest TRL configuration of
the same reference mode (precomputed reference: TRL configurations with `_pre`; reference
forward every step: those without).

Usage: anchor_table.py WORK RUNS ROUNDS [TRL_CONFIGS] [ROPO_DTYPES]
  WORK: the TRL work folder (results/CFG_rN.json, time_CFG_rN.txt)
  RUNS: ropo's runs folder (anchor-DTYPE-precompute-{true,false}-rN/metrics.jsonl, .time.txt)
  TRL_CONFIGS: space-separated TRL configurations of this run
  ROPO_DTYPES: space-separated model.dtype values of this run (default "f32 bf16")
"""
import json
import statistics
import sys
from pathlib import Path


def peak_gib(time_file: Path) -> float:
    """Maximum resident set size from `/usr/bin/time -v`, in GiB."""
    for line in time_file.read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) / 2**20
    raise SystemExit(f"{time_file}: no 'Maximum resident set size' line")


def ropo_tok_s(metrics: Path) -> float:
    """Median tokens_per_second of the training steps 2-6 (metrics.jsonl, logging_steps = 1)."""
    steps = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    rates = [s["tokens_per_second"] for s in steps if "loss" in s and "eval/loss" not in s and 2 <= s.get("step", 0) <= 6]
    if len(rates) < 5:
        raise SystemExit(f"{metrics}: expected 5 logged steps 2-6, found {len(rates)}")
    return statistics.median(rates)


def main() -> None:
    work, runs, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    configs = (sys.argv[4] if len(sys.argv) > 4 else "lora_qkvo lora_qkvo_bf16 hra_qkvo hra_qkvo_bf16 lora_qkvo_pre lora_qkvo_pre_bf16").split()
    dtypes = (sys.argv[5] if len(sys.argv) > 5 else "f32 bf16").split()
    rows = {}  # name -> (precomputed?, [(tok/s, GiB)])
    for cfg in configs:
        got = [(json.loads((work / "results" / f"{cfg}_r{r}.json").read_text())["median_tok_per_s_steps2to6"], peak_gib(work / f"time_{cfg}_r{r}.txt"))
               for r in range(1, rounds + 1) if (work / "results" / f"{cfg}_r{r}.json").exists()]
        if got:
            rows[f"TRL + PEFT {cfg}"] = ("_pre" in cfg, got)
    for dtype in dtypes:
        for pre in ["true", "false"]:
            got = []
            for r in range(1, rounds + 1):
                d = runs / f"anchor-{dtype}-precompute-{pre}-r{r}"
                if (d / "metrics.jsonl").exists():
                    got.append((ropo_tok_s(d / "metrics.jsonl"), peak_gib(runs / f"anchor-{dtype}-precompute-{pre}-r{r}.time.txt")))
            if got:
                mode = "precomputed reference" if pre == "true" else "reference forward every step"
                rows[f"ropo RoPO q,k,v,o, {dtype}, {mode}"] = (pre == "true", got)
    med = {k: statistics.median(t for t, _ in g) for k, (_, g) in rows.items()}
    rss = {k: max(m for _, m in g) for k, (_, g) in rows.items()}
    fastest = {}
    for pre in (True, False):
        trl = [k for k, (p, _) in rows.items() if k.startswith("TRL") and p == pre]
        if trl:
            fastest[pre] = max(trl, key=lambda k: med[k])
    print("| run | reference | tokens/s (each round) | median | peak RSS GiB (max) | vs fastest TRL of its mode | tok/s ratio | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (pre, got) in rows.items():
        mode = "precomputed" if pre else "every step"
        cells = [name, mode, " / ".join(f"{t:.0f}" for t, _ in got), f"{med[name]:.0f}", f"{rss[name]:.2f}"]
        f = fastest.get(pre)
        if name.startswith("ropo") and f:
            cells += [f[len("TRL + PEFT "):], f"{med[name] / med[f]:.2f}", f"{rss[name] / rss[f]:.2f}"]
        elif name == f:
            cells += ["(fastest)", "1.00", "1.00"]
        else:
            cells += ["", "", ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

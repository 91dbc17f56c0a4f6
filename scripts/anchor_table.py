#!/usr/bin/env python3
"""Table of scripts/anchor_compare.sh: TRL + PEFT vs ropo, median real tokens/s of steps 2-6
and peak RSS of each run, and ropo's ratios against each TRL configuration.

Usage: anchor_table.py WORK RUNS ROUNDS [TRL_CONFIGS]
  WORK: the TRL work folder (results/CFG_rN.json, time_CFG_rN.txt)
  RUNS: ropo's runs folder (anchor-precompute-{true,false}-rN/metrics.jsonl, .time.txt)
  TRL_CONFIGS: space-separated TRL configurations of this run (default "hra_qkvo lora_qkvo")
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
    rows = {}
    configs = (sys.argv[4] if len(sys.argv) > 4 else "hra_qkvo lora_qkvo").split()
    for cfg in configs:
        got = [(json.loads((work / "results" / f"{cfg}_r{r}.json").read_text())["median_tok_per_s_steps2to6"], peak_gib(work / f"time_{cfg}_r{r}.txt"))
               for r in range(1, rounds + 1) if (work / "results" / f"{cfg}_r{r}.json").exists()]
        if got:
            rows[f"TRL + PEFT {cfg}"] = got
    for pre in ["true", "false"]:
        got = []
        for r in range(1, rounds + 1):
            d = runs / f"anchor-precompute-{pre}-r{r}"
            if (d / "metrics.jsonl").exists():
                got.append((ropo_tok_s(d / "metrics.jsonl"), peak_gib(runs / f"anchor-precompute-{pre}-r{r}.time.txt")))
        if got:
            name = "ropo RoPO q,k,v,o, " + ("precomputed reference" if pre == "true" else "reference forward every step")
            rows[name] = got
    trl = {k: v for k, v in rows.items() if k.startswith("TRL")}
    head = "| run | tokens/s (each round) | median | peak RSS GiB (max) |" + "".join(f" x {k[11:]} tok/s | x {k[11:]} RSS |" for k in trl)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, got in rows.items():
        tok = statistics.median(t for t, _ in got)
        rss = max(m for _, m in got)
        cells = [name, " / ".join(f"{t:.0f}" for t, _ in got), f"{tok:.0f}", f"{rss:.2f}"]
        for vals in trl.values():
            cells += [f"{tok / statistics.median(t for t, _ in vals):.2f}", f"{rss / max(m for _, m in vals):.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write the Parquet test fixtures of tests/parquet.rs with pyarrow (the library the Hub's
`datasets` writes Parquet with), each beside a JSONL twin holding the same rows.

The rows come from the shared public data (../shared/data): orca_dpo_pairs/validation.jsonl
(OpenAI layout) and hh_rlhf_harmless/harmless-base-test.jsonl.gz (Anthropic HH), the shortest
ones, rewritten into each of ropo's row formats.

    ~/.cache/ropo/anchor/venv/bin/python scripts/make_parquet_fixtures.py   # pyarrow 26

Writes tests/fixtures/parquet/ (about 100 KB):
  <format>.parquet + <format>.jsonl   standard, implicit_prompt (lz4), conversational, openai, hh (brotli),
                                      sharegpt (gzip), alpaca, chat_template, axolotl_argilla, axolotl_icr,
                                      axolotl_intel, axolotl_ultra, axolotl_nectar; the others snappy
  multi_group.parquet (+ .jsonl)      20 standard rows in row groups of 6 (zstd)
  hub/data/train-0000{0,1}-of-00002.parquet, hub/data/test-00000-of-00001.parquet (+ .jsonl twins
                                      in hub_twins/): a dataset repo's files in the Hub's layout
  prompts.parquet (+ .jsonl)          3 prompts for `ropo eval --prompts` (null columns = absent keys)
  bad_type.parquet                    `chosen` stored as int64
"""

import gzip
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
OUT = os.path.join(ROOT, "tests", "fixtures", "parquet")


def orca_rows(n):
    with open(os.path.join(SHARED, "orca_dpo_pairs", "validation.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: len(json.dumps(r)))
    return rows[:n]


def hh_rows(n):
    with gzip.open(os.path.join(SHARED, "hh_rlhf_harmless", "harmless-base-test.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: len(r["chosen"]) + len(r["rejected"]))
    return rows[:n]


def split(r):
    """(system text or None, user text, chosen text, rejected text) of an orca row."""
    msgs = r["input"]["messages"]
    system = next((m["content"] for m in msgs if m["role"] == "system"), None)
    user = next(m["content"] for m in msgs if m["role"] == "user")
    return system, user, r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]


def formats(orca, hh):
    out = {}
    out["standard"] = [{"prompt": u, "chosen": " " + c, "rejected": " " + j} for _, u, c, j in map(split, orca)]
    out["conversational"] = [
        {"prompt": r["input"]["messages"], "chosen": r["preferred_output"], "rejected": r["non_preferred_output"]} for r in orca
    ]
    out["implicit_prompt"] = [
        {"chosen": r["input"]["messages"] + r["preferred_output"], "rejected": r["input"]["messages"] + r["non_preferred_output"]}
        for r in orca
    ]
    out["openai"] = orca
    out["hh"] = hh
    out["sharegpt"] = [
        {"conversations": [{"from": "human", "value": u}], "system": s or "", "chosen": {"from": "gpt", "value": c},
         "rejected": {"from": "gpt", "value": j}}
        for s, u, c, j in map(split, orca)
    ]
    # the LLaMA-Factory and axolotl layouts (src/data/formats.rs)
    trio = list(map(split, orca))
    out["alpaca"] = [{"instruction": u, "input": "", "chosen": c, "rejected": j, "system": s or "",
                      "history": [["Hello.", "Hi! How can I help?"]] if i % 2 else []} for i, (s, u, c, j) in enumerate(trio)]
    out["chat_template"] = [{"messages": r["input"]["messages"], "chosen": r["preferred_output"][0],
                             "rejected": r["non_preferred_output"][0]} for r in orca]
    out["axolotl_argilla"] = [{"system": s or "", "instruction": u, "chosen_response": c, "rejected_response": j} for s, u, c, j in trio]
    out["axolotl_icr"] = [{"system": s or "", "input": u, "chosen": c, "rejected": j} for s, u, c, j in trio]
    out["axolotl_intel"] = [{"system": s or "", "question": u, "chosen": c, "rejected": j} for s, u, c, j in trio]
    out["axolotl_ultra"] = [{"prompt": u, "chosen": [{"role": "user", "content": u}, {"role": "assistant", "content": c}],
                             "rejected": [{"role": "user", "content": u}, {"role": "assistant", "content": j}]} for _, u, c, j in trio]
    out["axolotl_nectar"] = [{"prompt": f"\n\nHuman: {u}\n\nAssistant: ",
                              "answers": [{"answer": j, "rank": 2.0}, {"answer": c, "rank": 1.0}, {"answer": j + " Maybe.", "rank": 3.0}]}
                             for _, u, c, j in trio]
    return out


def write(name, rows, **kw):
    path = os.path.join(OUT, name + ".parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, **kw)
    return path


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    orca = orca_rows(8)
    # every codec pyarrow writes, one format each (snappy, pyarrow's default, for the rest)
    codecs = {"hh": "brotli", "sharegpt": "gzip", "implicit_prompt": "lz4"}
    for name, rows in formats(orca, hh_rows(8)).items():
        write(name, rows, compression=codecs.get(name, "snappy"))
        write_jsonl(os.path.join(OUT, name + ".jsonl"), rows)

    many = formats(orca_rows(20), [])["standard"]
    write("multi_group", many, row_group_size=6, compression="zstd")
    write_jsonl(os.path.join(OUT, "multi_group.jsonl"), many)

    # a dataset repo as the Hub stores it: two train shards and a test split
    rows = formats(orca_rows(30)[10:], [])["conversational"]
    parts = {"train-00000-of-00002": rows[0:7], "train-00001-of-00002": rows[7:14], "test-00000-of-00001": rows[14:20]}
    for stem, part in parts.items():
        write("hub/data/" + stem, part)
        write_jsonl(os.path.join(OUT, "hub_twins", stem + ".jsonl"), part)

    # a prompts file (`ropo eval --prompts`): text prompts and message lists
    prompts = [{"prompt": "Write a brief sentence.", "messages": None},
               {"prompt": None, "messages": [{"role": "user", "content": "Name a colour."}]},
               {"prompt": None, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]}]
    write("prompts", prompts)
    write_jsonl(os.path.join(OUT, "prompts.jsonl"), [{k: v for k, v in r.items() if v is not None} for r in prompts])

    bad = [{"prompt": "p", "chosen": 3, "rejected": "b"}]
    write("bad_type", bad)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Which files of a dataset repo make each split, as the `datasets` library itself decides
(`get_data_patterns` + `DataFilesDict.from_patterns`, run on empty files laid out in a temporary
folder): the oracle of `ropo::data::hub::split_files` (tests/hub_splits.rs).

    ~/.cache/ropo/anchor/venv/bin/python scripts/golden_split_files.py   # datasets 5.2

Writes tests/fixtures/hub_split_files_golden.json.
"""

import json
import os
import sys
import tempfile

import datasets
from datasets.data_files import DataFilesDict, get_data_patterns

CASES = [
    # the Hub's sharded Parquet layout (e.g. trl-lib/ultrafeedback_binarized, HuggingFaceH4/*)
    ["README.md", ".gitattributes", "data/train_prefs-00000-of-00001.parquet", "data/test_prefs-00000-of-00001.parquet",
     "data/train_gen-00000-of-00002.parquet", "data/train_gen-00001-of-00002.parquet"],
    ["data/train-00000-of-00001.parquet", "extra/test.jsonl"],
    # the parquet converter's layout
    ["default/train/0000.parquet", "default/test/0000.parquet", "default/train/0001.parquet"],
    # split names in file names
    ["README.md", "train.jsonl", "dev.jsonl"],
    ["train.jsonl", "validation.jsonl", "test.jsonl"],
    # Anthropic/hh-rlhf's layout: the keyword after a separator
    ["harmless-base/train.jsonl.gz", "harmless-base/test.jsonl.gz", "helpful-base/train.jsonl.gz",
     "helpful-base/test.jsonl.gz"],
    ["prefs_train.parquet", "prefs_eval.parquet", "prefs-valid-1.jsonl"],
    # no split named: all train
    ["prefs.jsonl", "more/prefs2.parquet"],
    # folders win over file names
    ["train/a.jsonl", "b_test.jsonl"],
    # a keyword must stand between separators
    ["my_eval_set.json", "pretraining.jsonl"],
    ["training-data/a.parquet", "eval 2/b.parquet"],
]

SPLITS = ["train", "validation", "test"]


def resolve(files):
    with tempfile.TemporaryDirectory() as d:
        for f in files:
            p = os.path.join(d, f)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "w").close()
        try:
            patterns = get_data_patterns(d)
        except Exception:  # EmptyDatasetError: no data file
            return {}
        resolved = DataFilesDict.from_patterns(patterns, base_path=d)
        return {str(k): sorted(os.path.relpath(p, d) for p in v) for k, v in resolved.items()}


def main():
    cases = []
    for files in CASES:
        got = resolve(files)
        splits = {s: got.get(s, []) for s in sorted(set(SPLITS) | set(got))}
        cases.append({"files": files, "splits": splits})
    out = {"source": f"datasets {datasets.__version__}: get_data_patterns + DataFilesDict.from_patterns", "cases": cases}
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hub_split_files_golden.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Read a GGUF written by `ropo merge --out FILE.gguf` with the `gguf` Python package (llama.cpp's
own reader, gguf-py) and check what llama.cpp needs: every tensor readable with its llama.cpp name,
shape and type, the architecture's hyperparameter keys, the tokenizer and chat template; optionally
that tokens, token types and merges equal those of a reference GGUF (e.g. the source model).

    ~/.cache/ropo/anchor/venv/bin/python scripts/check_gguf.py merged.gguf [source.gguf]

(the venv of scripts/anchor_compare.sh has `gguf`; or `pip install gguf`). Exits 1 on a problem.
"""
import sys

import numpy as np
from gguf import GGUFReader


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        return None
    if len(f.data) == 1 and f.types[0].name != "ARRAY":
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0].name == "STRING" else v.tolist()[0]
    if f.types[-1].name == "STRING":
        return [bytes(f.parts[i]).decode() for i in f.data]
    return [f.parts[i].tolist()[0] for i in f.data]


def main():
    path = sys.argv[1]
    r = GGUFReader(path)
    problems = []
    arch = field(r, "general.architecture")
    for k in ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base"]:
        if field(r, f"{arch}.{k}") is None:
            problems.append(f"missing {arch}.{k}")
    for k in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]:
        if field(r, k) is None:
            problems.append(f"missing {k}")
    n_layers = field(r, f"{arch}.block_count")
    names = {t.name for t in r.tensors}
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{m}.weight" for i in range(n_layers) for m in
        ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"]}
    if want - names:
        problems.append(f"missing tensors {sorted(want - names)[:5]}")
    types = {}
    total = 0
    for t in r.tensors:
        data = np.asarray(t.data)  # every tensor's bytes, read
        if not np.all(np.isfinite(data.astype(np.float32))) and t.tensor_type.name in ("F32", "F16"):
            problems.append(f"{t.name}: non-finite values")
        if t.name.endswith("_norm.weight") and t.tensor_type.name != "F32":
            problems.append(f"{t.name}: norms must be F32, got {t.tensor_type.name}")
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        total += int(t.n_elements)
    tokens = field(r, "tokenizer.ggml.tokens")
    print(f"{path}: arch {arch}, {len(r.tensors)} tensors read ({total} elements; types {types}), "
          f"{len(field(r, 'tokenizer.ggml.merges'))} merges, {len(tokens)} tokens, pre {field(r, 'tokenizer.ggml.pre')!r}, "
          f"file_type {field(r, 'general.file_type')}, chat template {len(field(r, 'tokenizer.chat_template'))} chars")
    if len(sys.argv) > 2:
        s = GGUFReader(sys.argv[2])
        for k in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", f"{arch}.block_count", f"{arch}.embedding_length"]:
            if field(r, k) != field(s, k):
                problems.append(f"{k} differs from {sys.argv[2]}")
        print(f"tokenizer and hyperparameters compared with {sys.argv[2]}")
    for p in problems:
        print("problem:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

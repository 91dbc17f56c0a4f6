#!/usr/bin/env python3
"""Compare two GGUF files tensor by tensor, Q8_0 blocks byte by byte: ropo's
`ropo merge --out X.gguf --dtype q8_0` against llama.cpp's `llama-quantize` of the f32 export
of the same merge (run by scripts/llama_cpp_generate.sh).

    PYTHON scripts/compare_q8_0.py ropo-q8_0.gguf llama-quantize-q8_0.gguf

A Q8_0 block is 34 bytes: an f16 scale d, then 32 int8 quants. Prints the number of
byte-identical tensors and, for each differing one, its blocks, differing scales and the
largest quant difference. Exits 1 if a tensor's name set, type or bytes differ.
"""
import sys

import numpy as np
from gguf import GGUFReader

BLOCK = 34  # 2 bytes f16 scale + 32 int8


def main(ours, theirs):
    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    if set(ta) != set(tb):
        print("tensor names differ:", sorted(set(ta) ^ set(tb)))
        return 1
    same, report = 0, []
    for name, t in ta.items():
        u = tb[name]
        if t.tensor_type != u.tensor_type:
            report.append(f"{name}: type {t.tensor_type.name} vs {u.tensor_type.name}")
            continue
        x = np.asarray(t.data).view(np.uint8).ravel()
        y = np.asarray(u.data).view(np.uint8).ravel()
        if np.array_equal(x, y):
            same += 1
            continue
        if t.tensor_type.name != "Q8_0":
            report.append(f"{name} ({t.tensor_type.name}): bytes differ")
            continue
        bx, by = x.reshape(-1, BLOCK), y.reshape(-1, BLOCK)
        d_eq = (bx[:, :2] == by[:, :2]).all(1)
        qx, qy = bx[:, 2:].view(np.int8).astype(int), by[:, 2:].view(np.int8).astype(int)
        q_eq = (qx == qy).all(1)
        report.append(
            f"{name}: {int((~(d_eq & q_eq)).sum())} of {len(bx)} blocks differ "
            f"({int((~d_eq).sum())} scales), max |quant difference| {int(np.abs(qx - qy).max())}"
        )
    types = {}
    for t in ta.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print(f"{len(ta)} tensors ({', '.join(f'{v} {k}' for k, v in sorted(types.items()))}): "
          f"{same} byte-identical, {len(report)} differ")
    for line in report:
        print("  " + line)
    return 1 if report else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))

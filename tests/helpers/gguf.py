"""Shared by the GGUF tests: the tiny model, prompts, tricky strings, and the llama.cpp requirement."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.tokenizer import EOS_ID, VOCAB_SIZE
from model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[2]
CONTEXT = 256  # the model's max_seq_len: the GGUF's context length must be this
# RoPE base far from the 10K default, so a file that dropped it could not match.
CFG = ModelConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  rope_theta=1_000.0, max_seq_len=CONTEXT)
LLAMA_MISSING = ("llama-cpp-python is not installed; run `bash .ci/llama-cpp.sh` (builds llama.cpp once, then "
                 "installs from the cached wheel)")
LOGIT_TOL = 1e-4  # f32 file, f32 KV cache, against transformers fp32 (measured ~3e-6)
STOP_AFTER = 5  # the chat model answers this many tokens, then <|im_end|>
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Solve for x: 3x + 7 = 22. First, subtract 7",
    "日本語と English が混ざった文章 🎉",
]
CHAT = [
    {"role": "system", "content": "You are a careful math tutor. Answer briefly."},
    {"role": "user", "content": "What is 12 * 13?"},
    {"role": "assistant", "content": "12 * 13 = 156."},
    {"role": "user", "content": "And 156 / 4? Don't show steps."},
    {"role": "assistant", "content": "39"},
    {"role": "user", "content": "Thanks! Now 7 squared, as a number only."},
]
TRICKY = [
    *("1234567890123"[:n] for n in range(1, 13)),  # digit runs of 1-12 digits (cl100k splits them in threes)
    "year 2024, pi 3.14159265, phone +1-555-0100, 1000000000000 and 007",
    "a b  c   d    e     f", "      ", "\t", "\t\tx\t \ty", "\n", "\n\n\n", "a\n\nb\n \n c", "trailing   ",
    "line one\r\nline two\r\n\r\n", "\r\n\r\n\r\n", "\r", "mixed \r\n\t \n  end",
    " leading", "  two leading", "   three", " \n leading newline",
    "I'm, you're, he's, she'd, we'll, they've, don't", "I'M YOU'RE HE'S SHE'D WE'LL THEY'VE DON'T",
    "You'Re We'Ll It'S i'D", "'s 'S 'll rock'n'roll ''quoted''",
    "café naïve résumé Ångström façade", "e\u0301 vs \u00e9", "Straße ÆØÅ ǅ",
    "日本語のテキスト", "中文分词测试，标点。", "한국어 문장입니다", "Привет, мир!", "مرحبا بالعالم", "ភាសាខ្មែរ",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🎉🎉 🏳️‍🌈", "math ∑ ∫ √ ≤ ≥ ≠ ∞ → ⇒",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "if (a && b) { return arr[i++]; } else { x -= 0x1F; }",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', "SELECT * FROM t WHERE id <> 3;",
    "<|im_start|>user<|im_sep|>hi<|im_end|>", "<|endoftext|>", "<|dummy_85|> <|fim_prefix|>x<|fim_suffix|>",
    "<|im_start|", "|im_end|>", "<<|im_sep|>>",
]


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.fail(f"{LLAMA_MISSING} ({e})")
    return llama_cpp


@torch.no_grad()
def tiny_model(seed: int = 0) -> Transformer:
    """Every weight random, norms included, with logits spread enough that greedy choices are clear."""
    torch.manual_seed(seed)
    model = Transformer(CFG)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def greedy(model: Transformer, ids: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after ids, and the smallest top-1 margin on the way."""
    ids, margin = list(ids), float("inf")
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        top = torch.topk(logits, 2).values
        margin = min(margin, (top[0] - top[1]).item())
        ids.append(int(logits.argmax()))
    return ids[len(ids) - n:], margin


@torch.no_grad()
def make_it_stop(model: Transformer, prompt: list[int], k: int) -> list[int]:
    """Set the <|im_end|> row of the LM head so that greedy decoding from `prompt` gives k tokens, then <|im_end|>;
    returns those k tokens. The row is the part of that step's final hidden state orthogonal to the earlier steps'
    (so it scores 0 there), scaled to win by 2."""
    w = model.output.weight
    w[EOS_ID] = 0.0
    answer, margin = greedy(model, prompt, k)
    assert margin > 1e-2 and EOS_ID not in answer, (margin, answer)
    hidden = {}
    hook = model.norm.register_forward_hook(lambda m, i, out: hidden.update(x=out[0]))
    logits = model(torch.tensor([prompt + answer]))[0]
    hook.remove()
    states = hidden["x"][len(prompt) - 1:]  # (k + 1, dim): the states that choose each answer token, then the stop
    basis, _ = torch.linalg.qr(states[:-1].T)
    x = states[-1] - basis @ (basis.T @ states[-1])
    w[EOS_ID] = x / x.norm() ** 2 * (logits[-1].max() + 2.0)
    steps = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1:]
    assert int(steps[-1].argmax()) == EOS_ID
    others = steps[:-1].clone()
    eos = others[:, EOS_ID].clone()
    others[:, EOS_ID] = -float("inf")
    assert (eos < others.max(-1).values - 0.5).all(), "the stop row would fire early; pick another k"
    return answer

"""GGUF export checked with the real llama.cpp (llama-cpp-python): its tokenizer gives our ids on tricky strings, its
next-token logits and greedy continuations match the HF export under transformers, its chat handlers render our ids
and stop at <|im_end|>. Figures (logit differences, top-1 agreement of the quantized files) print with `-s`."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from data.tokenizer import (BOS_ID, CHAT_TEMPLATE, EOS_ID, NUM_BPE_RANKS, PAD_ID, VOCAB_SIZE, Phi4Tokenizer,
                            load_bpe_ranks)
from model import ModelConfig, Transformer
from train.export.gguf import (GGUF_TYPES, Q, bpe_vocab, byte_alphabet, encode_tensor, modelfile_text, storage_type,
                               to_gguf)
from train.export.hf import to_hf
from train.export.run import main as export_main

REPO = Path(__file__).resolve().parents[3]
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


@pytest.fixture(scope="module")
def tok() -> Phi4Tokenizer:
    return Phi4Tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """The model as an fp32 HF export, and as GGUF files of every type; f32 through the CLI from the HF export, f16
    with --gguf beside a second HF export (the recipe's path), bf16 and q8_0 by to_gguf. "chat": an f32 file of the
    model changed to answer CHAT with `answer` and stop (its stop row fires elsewhere too, so only the chat uses it)."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_model()
    to_hf(model, root / "hf", tokenizer=tok, dtype=torch.float32)
    stopping = tiny_model()
    answer = make_it_stop(stopping, tok.apply_chat_template(CHAT, add_generation_prompt=True), STOP_AFTER)
    out = {"root": root, "hf": root / "hf", "model": model, "answer": answer, "chat": root / "chat" / "chat.gguf"}
    to_gguf(stopping, out["chat"], "f32", tokenizer=tok)
    out["f32"] = root / "f32" / "model-f32.gguf"
    assert export_main([str(root / "hf"), str(out["f32"]), "--format", "gguf", "--gguf-type", "f32"]) == 0
    out["f16"] = root / "f16" / "model-f16.gguf"
    assert export_main([str(root / "hf"), str(root / "hf-bf16"), "--gguf", str(out["f16"]), "--gguf-type", "f16"]) == 0
    for t in ("bf16", "q8_0"):
        out[t] = root / t / f"model-{t}.gguf"
        to_gguf(model, out[t], t, tokenizer=tok)
    return out


def test_merges_cover_every_split(tok):
    tokens, merges = bpe_vocab(str(tok.bpe_path), tok.bpe_sha256)
    from_char = {c: b for b, c in enumerate(byte_alphabet())}
    ranks, _ = load_bpe_ranks(tok.bpe_path, tok.bpe_sha256)
    assert len(tokens) == NUM_BPE_RANKS and all(bytes(from_char[c] for c in tokens[r]) == t for t, r in ranks.items())
    assert len(merges) == 233_378 and len(set(merges)) == len(merges)  # every two-token split of every rank
    assert merges[0] == "Ġ Ġ"  # rank 256, two spaces: the first merge
    results = [ranks[bytes(from_char[c] for c in m.replace(" ", ""))] for m in merges]
    assert results == sorted(results)  # in the order of the ranks they make


@pytest.mark.parametrize("gguf_type", sorted(GGUF_TYPES))
def test_tensor_encoding(gguf_type):
    """Each type's storage of a 2-D weight and of a norm weight, decoded again by the gguf package."""
    g = torch.Generator().manual_seed(1)
    weight, norm = torch.randn(48, 64, generator=g), 1 + 0.1 * torch.randn(64, generator=g)
    assert storage_type("blk.0.ffn_norm.weight", (64,), gguf_type) == Q.F32
    qtype = storage_type("blk.0.ffn_up.weight", (48, 64), gguf_type)
    assert qtype == GGUF_TYPES[gguf_type][1]
    assert torch.equal(torch.from_numpy(encode_tensor(norm, Q.F32)), norm)
    back = torch.from_numpy(gguf.quants.dequantize(encode_tensor(weight, qtype), qtype).copy()).reshape(48, 64)
    if qtype == Q.F32:
        assert torch.equal(back, weight)
    elif qtype == Q.F16:
        assert torch.equal(back, weight.half().float())
    elif qtype == Q.BF16:
        assert torch.equal(back, weight.bfloat16().float())
    else:  # q8_0, per block of 32: scale d = max|x| / 127 stored in f16, so error <= d/2 + 127 * (f16 error of d)
        blocks = weight.reshape(-1, 32)
        err = (back.reshape(-1, 32) - blocks).abs().max(-1).values
        assert (err <= blocks.abs().max(-1).values / 127 * 0.57).all()
        assert storage_type("blk.0.attn_output.weight", (48, 40), gguf_type) == Q.F16  # 40 is no whole block


def test_modelfile_and_outputs(files):
    for t in GGUF_TYPES:
        path = files[t]
        text = (path.parent / "Modelfile").read_text()
        assert text == modelfile_text(path.name, CONTEXT)
        assert f"FROM ./{path.name}\n" in text and f"PARAMETER num_ctx {CONTEXT}\n" in text
        assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}" in text
        assert sorted(p.name for p in path.parent.iterdir()) == sorted(["Modelfile", path.name])  # no temp files
    assert (files["root"] / "hf-bf16" / "model.safetensors").is_file()  # --gguf wrote the HF export too


def test_refusals(files, tmp_path, capsys):
    model = files["model"]
    with pytest.raises(ValueError, match=r"must end in \.gguf"):
        to_gguf(model, tmp_path / "model.bin")
    with pytest.raises(ValueError, match="gguf_type='q4_k'"):
        to_gguf(model, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(FileExistsError, match="overwrite"):
        to_gguf(model, files["q8_0"], "q8_0")
    toy = Transformer(ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64))
    with pytest.raises(ValueError, match="vocab_size=512"):
        to_gguf(toy, tmp_path / "toy.gguf")
    assert not list(tmp_path.iterdir())
    assert export_main([str(files["hf"]), str(tmp_path / "x.gguf"), "--format", "gguf", "--gguf", "y.gguf"]) == 2
    assert export_main([str(files["hf"]), str(files["q8_0"]), "--format", "gguf"]) == 2
    assert "export error" in capsys.readouterr().err


# --- llama.cpp reads it --------------------------------------------------------------------------------------------

class LlamaLog:
    """llama.cpp's own log lines with their ggml levels (1 debug, 2 info, 3 warning, 4 error), while the block runs."""

    def __init__(self, llama_cpp):
        self.llama_cpp, self.lines = llama_cpp, []

    def __enter__(self):
        def record(level, text, _user):
            self.lines.append((int(level), text.decode("utf-8", "replace")))
        self._callback = self.llama_cpp.llama_log_callback(record)
        self.llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        from llama_cpp._logger import llama_log_callback  # llama-cpp-python's own sink
        self.llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def load(path: Path, **kwargs):
    # One thread: on a busy 2-core machine llama.cpp's spinning thread pool makes 2 threads ~30x slower at this size.
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT, n_threads=1, n_threads_batch=1, seed=0,
                           verbose=False, **kwargs)


def test_llama_cpp_loads_it_as_phi4_without_warnings(files, tok):
    llama_cpp = require_llama_cpp()
    with LlamaLog(llama_cpp) as log:
        llm = llama_cpp.Llama(model_path=str(files["f32"]), n_ctx=CONTEXT, n_threads=1, verbose=True)
    text = "".join(line for _, line in log.lines)
    assert "pre-tokenizer" not in text and "GENERATION QUALITY" not in text, text
    warnings = [line for level, line in log.lines if level in (3, 4)]
    assert not warnings, warnings  # a file without tokenizer.ggml.pre gets 7 lines here, "GENERATION QUALITY..."
    assert re.search(r"print_info: arch\s+= phi3", text) and re.search(r"print_info: vocab type\s+= BPE", text)
    assert (llm.metadata["general.architecture"], llm.metadata["tokenizer.ggml.pre"]) == ("phi3", "dbrx")
    assert llm._model.n_ctx_train() == CONTEXT and llm.n_vocab() == VOCAB_SIZE
    assert (llm.token_bos(), llm.token_eos()) == (BOS_ID, EOS_ID)
    vocab = llm._model.vocab
    assert all(llama_cpp.llama_vocab_is_control(vocab, i) for i in tok.special_tokens.values())
    assert llama_cpp.llama_vocab_is_eog(vocab, EOS_ID)
    assert not any(llama_cpp.llama_vocab_is_eog(vocab, i) for i in range(NUM_BPE_RANKS))


def test_metadata_and_vocabulary_as_llama_cpp_reads_them(files, tok):
    llama_cpp = require_llama_cpp()
    llm = load(files["q8_0"])
    expected = {
        "general.architecture": "phi3", "general.file_type": str(int(GGUF_TYPES["q8_0"][0])),
        "phi3.context_length": str(CONTEXT), "phi3.embedding_length": "32", "phi3.feed_forward_length": "64",
        "phi3.block_count": "2", "phi3.attention.head_count": "4", "phi3.attention.head_count_kv": "2",
        "phi3.attention.layer_norm_rms_epsilon": "0.000010", "phi3.rope.dimension_count": "8",
        "phi3.rope.freq_base": "1000.000000", "phi3.attention.sliding_window": "0",
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "dbrx",
        "tokenizer.ggml.bos_token_id": str(BOS_ID), "tokenizer.ggml.eos_token_id": str(EOS_ID),
        "tokenizer.ggml.eot_token_id": str(EOS_ID), "tokenizer.ggml.padding_token_id": str(PAD_ID),
        "tokenizer.ggml.add_bos_token": "false", "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: llm.metadata.get(k) for k in expected} == expected
    vocab = llm._model.vocab
    assert llama_cpp.llama_vocab_n_tokens(vocab) == VOCAB_SIZE and not llama_cpp.llama_vocab_get_add_bos(vocab)
    tokens, _ = bpe_vocab(str(tok.bpe_path), tok.bpe_sha256)
    texts = [llama_cpp.llama_vocab_get_text(vocab, i).decode() for i in range(VOCAB_SIZE)]
    assert texts[:NUM_BPE_RANKS] == tokens
    assert {t: texts[i] for t, i in tok.special_tokens.items()} == {t: t for t in tok.special_tokens}
    attrs = [llama_cpp.llama_vocab_get_attr(vocab, i) for i in range(VOCAB_SIZE)]
    assert set(attrs[:NUM_BPE_RANKS]) == {llama_cpp.LLAMA_TOKEN_ATTR_NORMAL}
    assert set(attrs[NUM_BPE_RANKS:]) == {llama_cpp.LLAMA_TOKEN_ATTR_CONTROL}
    assert (llama_cpp.llama_vocab_pad(vocab), llama_cpp.llama_vocab_eot(vocab)) == (PAD_ID, EOS_ID)


def pieces(llm, ids: list[int]) -> bytes:
    """llama.cpp's text for ids, token by token. Not `Llama.detokenize`: llama-cpp-python 0.3.36 reads each piece
    into a 32-byte buffer and drops longer ones (212 cl100k tokens, e.g. 64 spaces)."""
    llama_cpp = require_llama_cpp()
    buf, out = ctypes.create_string_buffer(256), b""
    for i in ids:
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, i, buf, len(buf), 0, False)
        assert 0 <= n <= len(buf), (i, n)
        out += buf.raw[:n]
    return out


def test_tokenizer_gives_our_ids(files, tok):
    llm = load(files["q8_0"], vocab_only=True)
    texts = TRICKY + [(REPO / "README.md").read_text(), (REPO / "data" / "tokenizer.py").read_text()]
    wrong = [(t[:60], llm.tokenize(t.encode(), add_bos=False, special=False)[:20], tok.encode(t)[:20])
             for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t)]
    assert not wrong, wrong
    undecoded = [t[:60] for t in texts if pieces(llm, tok.encode(t)) != t.encode()]
    assert not undecoded, undecoded
    print(f"\n[gguf] llama.cpp tokenizer = ours on {len(texts)} strings "
          f"({sum(len(tok.encode(t)) for t in texts)} tokens)")


def with_specials(tok: Phi4Tokenizer, text: str) -> list[int]:
    """Ids when special-token strings are parsed (what chat rendering does): split on them, encode the rest."""
    special = tok.special_tokens
    pattern = "(" + "|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)) + ")"
    return [i for part in re.split(pattern, text) if part
            for i in ([special[part]] if part in special else tok.encode(part))]


def test_special_strings_are_parsed_only_when_asked(files, tok):
    llm = load(files["q8_0"], vocab_only=True)
    for text in [t for t in TRICKY if "<|" in t or "|>" in t]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == with_specials(tok, text), text
    assert llm.tokenize(b"<|im_start|>user<|im_sep|>hi<|im_end|>", add_bos=False, special=True) == [
        100264, 882, 100266, 6151, 100265]


# --- llama.cpp runs it ---------------------------------------------------------------------------------------------

def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


@pytest.fixture(scope="module")
def reference(files, tok):
    """Per prompt: transformers' greedy continuation (32 tokens) of the HF export, and its fp32 logits over the prompt
    and that continuation (the positions every comparison uses)."""
    from transformers import Phi3ForCausalLM

    hf = Phi3ForCausalLM.from_pretrained(files["hf"], dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok.encode(p)
            gen = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32, output_scores=True,
                              return_dict_in_generate=True)
            greedy_ids = gen.sequences[0, len(ids):].tolist()
            top = torch.topk(torch.cat(gen.scores), 2, dim=-1).values
            margin = (top[:, 0] - top[:, 1]).min().item()
            # Logits within LOGIT_TOL cannot flip a choice won by more than 2 * LOGIT_TOL.
            assert margin > 10 * LOGIT_TOL, f"{p!r}: greedy near-tie ({margin:.2e}); the comparison would be luck"
            assert len(greedy_ids) == 32 and not {EOS_ID, BOS_ID} & set(greedy_ids), greedy_ids  # no early stop
            seq = ids + greedy_ids
            out.append({"ids": ids, "greedy": greedy_ids, "seq": seq, "logits": hf(torch.tensor([seq])).logits[0]})
    return out


def test_f32_logits_match_transformers(files, reference):
    llm = load(files["f32"], logits_all=True, type_k=0, type_v=0)  # ggml type 0 = f32: an f32 KV cache
    diffs = [(llama_logits(llm, r["seq"]) - r["logits"]).abs().max().item() for r in reference]
    assert max(diffs) <= LOGIT_TOL, diffs
    f16_cache = load(files["f32"], logits_all=True)  # llama.cpp's default f16 KV cache, for the record
    f16_diffs = [(llama_logits(f16_cache, r["seq"]) - r["logits"]).abs().max().item() for r in reference]
    assert max(f16_diffs) <= 1e-2, f16_diffs
    print(f"\n[gguf] f32 file: max |logit diff| vs transformers {max(diffs):.2e} (f32 KV cache), "
          f"{max(f16_diffs):.2e} (f16 KV cache), {len(reference)} prompts, all positions")


def test_greedy_continuations_identical(files, reference):
    llm = load(files["f32"], type_k=0, type_v=0)
    for r in reference:
        out = llm.create_completion(r["ids"], max_tokens=32, temperature=0.0, repeat_penalty=1.0)
        # llama.cpp has evaluated the prompt and every generated token but the last.
        generated = list(llm.input_ids[len(r["ids"]):llm.n_tokens])
        assert len(generated) >= 31 and generated == r["greedy"][:len(generated)], (generated, r["greedy"])
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 32
        assert out["choices"][0]["text"] == llm.detokenize(r["greedy"]).decode("utf-8", "ignore")


def test_quantized_files_agree(files, reference):
    figures = {}
    for t in ("f16", "bf16", "q8_0"):
        llm = load(files[t], logits_all=True, type_k=0, type_v=0)
        got = [llama_logits(llm, r["seq"]) for r in reference]
        agree = torch.cat([(g.argmax(-1) == r["logits"].argmax(-1)) for g, r in zip(got, reference)]).float()
        diff = max((g - r["logits"]).abs().max().item() for g, r in zip(got, reference))
        figures[t] = (agree.mean().item(), diff, agree.numel())
    print("\n[gguf] top-1 agreement with transformers fp32 over all positions: " + ", ".join(
        f"{t} {a:.1%} (max |diff| {d:.2e}, {n} positions)" for t, (a, d, n) in figures.items()))
    assert figures["f16"][0] >= 0.95 and figures["bf16"][0] >= 0.9 and figures["q8_0"][0] >= 0.9, figures


def test_chat_template_gives_our_ids_and_stops_at_im_end(files, tok):
    llama_cpp = require_llama_cpp()
    ours = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    llm = load(files["chat"], type_k=0, type_v=0)
    assert llm.chat_format == "chat_template.default"  # the GGUF's own template, rendered by Jinja2
    out = llm.create_chat_completion(messages=CHAT, max_tokens=32, temperature=0.0, repeat_penalty=1.0)
    assert out["usage"]["prompt_tokens"] == len(ours)
    assert list(llm.input_ids[:len(ours)]) == ours
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == tok.decode(files["answer"])
    assert list(llm.input_ids[len(ours):llm.n_tokens]) == (files["answer"] + [EOS_ID])[:llm.n_tokens - len(ours)]

    # llama.cpp's built-in renderer (llama-cli, llama-server without --jinja) on the same file's template.
    template = llama_cpp.llama_model_chat_template(llm._model.model, None)
    messages = (llama_cpp.llama_chat_message * len(CHAT))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in CHAT])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(template, messages, len(CHAT), True, buf, len(buf))
    assert 0 < n < len(buf)
    assert llm.tokenize(buf.raw[:n], add_bos=False, special=True) == ours

    # Known difference, as in transformers: the rendered prompt is tokenized with specials parsed, so a message that
    # contains "<|im_end|>" gets the special id there, where our render_chat keeps it as text.
    typed = [{"role": "user", "content": "is <|im_end|> a word?"}]
    llm.create_chat_completion(messages=typed, max_tokens=1, temperature=0.0)
    rendered = tok.decode(tok.apply_chat_template(typed, add_generation_prompt=True))
    assert list(llm.input_ids[:llm.n_tokens]) == with_specials(tok, rendered)[:llm.n_tokens]
    assert with_specials(tok, rendered) != tok.apply_chat_template(typed, add_generation_prompt=True)

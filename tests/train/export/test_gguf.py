"""GGUF export checked with the real llama.cpp (llama-cpp-python): its tokenizer gives our ids on tricky strings, its
next-token logits and greedy continuations match the HF export under transformers, its chat handlers render our ids
and stop at <|im_end|>. Figures (logit differences, top-1 agreement of the quantized files) print with `-s`."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import torch

from data.tokenizer import BOS_ID, CHAT_TEMPLATE, EOS_ID, NUM_BPE_RANKS, PAD_ID, VOCAB_SIZE, Phi4Tokenizer
from tests.helpers.gguf import CHAT, CONTEXT, LOGIT_TOL, REPO, TRICKY, require_llama_cpp
from train.export.gguf import GGUF_TYPES, bpe_vocab


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

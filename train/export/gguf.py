"""GGUF export for llama.cpp and Ollama: our weights under llama.cpp's `phi3` architecture, with our own tokenizer.

One file holds everything llama.cpp needs: the hyperparameters (context length = the producing stage's max_seq_len),
the cl100k BPE as a byte-level `gpt2` vocabulary whose merges are derived from our ranks, the 96 Phi-4 special tokens
at their ids as control tokens (text that merely looks like one stays text unless a caller asks llama.cpp to parse
specials), bos/eos/pad as in the HF export, `<|im_end|>` as end of generation, and the chat template. An Ollama
`Modelfile` goes beside it. Tensors are converted one at a time while written: memory stays at the model plus one
tensor, and the file appears under its name only when complete.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from data.fileio import atomic_path, atomic_write
from data.tokenizer import CHAT_TEMPLATE, NUM_BPE_RANKS, VOCAB_SIZE, Phi4Tokenizer, load_bpe_ranks
from model.config import ModelConfig
from model.transformer import Transformer

log = logging.getLogger(__name__)

ARCH = "phi3"  # llama.cpp runs Phi-4 as Phi-3: fused qkv (Q|K|V), fused gate|up (gate first), NeoX RoPE, no biases
TOKENIZER_MODEL = "gpt2"  # llama.cpp's byte-level BPE
# llama.cpp's name for the cl100k split (the regex of data.tokenizer.HF_PAT); it is also what llama.cpp's own
# converter picks for microsoft/phi-4. An unknown name would make llama.cpp refuse the file; none would degrade it.
PRE_TOKENIZER = "dbrx"
Q = gguf.GGMLQuantizationType
# --gguf-type -> (llama.cpp file type, storage of the 2-D weights). 1-D tensors (norm weights) stay f32 in every type.
GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
MODELFILE = "Modelfile"

# Per-layer GGUF name -> our parameter name; `{i}` is the layer index. The fused layouts already match llama.cpp's.
_LAYER_TENSORS = {
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_qkv.weight": "layers.{i}.attention.wqkv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w13.weight",  # llama.cpp splits it: SiLU(first half) * second
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
}


def gguf_tensor_map(n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> our parameter name, in the order the file stores them."""
    names = {"token_embd.weight": "tok_embeddings.weight"}
    for i in range(n_layers):
        names.update({g.format(i=i): ours.format(i=i) for g, ours in _LAYER_TENSORS.items()})
    names.update({"output_norm.weight": "norm.weight", "output.weight": "output.weight"})
    return names


def byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet: byte b -> one printable character (printable Latin-1 bytes stand for themselves,
    the other 68 bytes take code points 256, 257, ... in byte order), so every token is a valid string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return [alphabet[b] for b in range(256)]


@functools.lru_cache(maxsize=2)
def bpe_vocab(bpe_path: str, bpe_sha256: str) -> tuple[list[str], list[str]]:
    """(tokens of ranks 0..100255 in byte-level form, merges "left right") from a .tiktoken rank file.

    tiktoken merges, anywhere in a word, the adjacent pair whose concatenation has the lowest rank. A merge list gives
    that behaviour when it holds every split of every token into two tokens, ordered by the rank of the result
    (ties by the ranks of the parts): 233,378 merges for cl100k.
    """
    ranks, _ = load_bpe_ranks(Path(bpe_path), bpe_sha256)
    alphabet = byte_alphabet()
    as_text = {token: "".join(alphabet[b] for b in token) for token in ranks}
    tokens = [""] * len(ranks)
    splits = []
    for token, rank in ranks.items():
        tokens[rank] = as_text[token]
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None:
                splits.append((rank, left, right))
    splits.sort()
    merges = [f"{tokens[left]} {tokens[right]}" for _, left, right in splits]
    return tokens, merges


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Phi4Tokenizer) -> None:
    """Our tokenizer as llama.cpp's byte-level BPE: ranks as normal tokens, the 96 specials as control tokens."""
    tokens, merges = bpe_vocab(str(tokenizer.bpe_path), tokenizer.bpe_sha256)
    if len(tokens) != NUM_BPE_RANKS:
        raise ValueError(f"{tokenizer.bpe_path}: {len(tokens)} BPE ranks, expected {NUM_BPE_RANKS}")
    tokens = list(tokens)
    types = [gguf.TokenType.NORMAL] * NUM_BPE_RANKS
    by_id = {i: t for t, i in tokenizer.special_tokens.items()}
    for token_id in range(NUM_BPE_RANKS, VOCAB_SIZE):
        tokens.append(by_id[token_id])
        types.append(gguf.TokenType.CONTROL)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eos_id)  # <|im_end|> ends a turn: llama.cpp stops generating there
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)  # Phi-4 prompts carry no BOS
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def add_hyperparameters(writer: gguf.GGUFWriter, cfg: ModelConfig, gguf_type: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(GGUF_TYPES[gguf_type][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_rope_scaling_orig_ctx_len(cfg.max_seq_len)  # no long-context scaling: trained length = context
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.dim // cfg.n_heads)  # RoPE over the whole head
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_sliding_window(0)  # 0 = full causal attention (Phi-3 models use a window; Phi-4 does not)


def storage_type(name: str, shape: tuple[int, ...], gguf_type: str) -> gguf.GGMLQuantizationType:
    """How one tensor is stored: norm weights in f32; a q8_0 weight whose rows are not a whole number of 32-value
    blocks in f16 (llama.cpp's converter does the same)."""
    qtype = GGUF_TYPES[gguf_type][1]
    if len(shape) == 1:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        log.warning("%s: rows of %d values are not whole %s blocks of %d; stored as f16", name, shape[-1],
                    qtype.name, block)
        return Q.F16
    return qtype


def encode_tensor(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Tensor data as the file stores it (quantized types as bytes)."""
    x = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)  # bf16 rounds to nearest even; q8_0 as llama.cpp's reference quantizer


def check_vocab(cfg: ModelConfig) -> None:
    if cfg.vocab_size != VOCAB_SIZE:
        raise ValueError(f"model vocab_size={cfg.vocab_size}; a GGUF export needs the Phi-4 vocabulary of "
                         f"{VOCAB_SIZE} (100,256 cl100k ranks + 96 special ids), since the file carries our tokenizer")


def to_gguf(model: Transformer, path: str | os.PathLike, gguf_type: str = "q8_0",
            tokenizer: Phi4Tokenizer | None = None, name: str = "phi4-recipe", overwrite: bool = False,
            modelfile: bool = True) -> dict:
    """Write `model` as a GGUF file for llama.cpp (and an Ollama Modelfile beside it); returns what was written."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: a GGUF file name must end in .gguf")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}; expected one of {sorted(GGUF_TYPES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    cfg = model.cfg
    check_vocab(cfg)
    tokenizer = tokenizer or Phi4Tokenizer()
    params = dict(model.named_parameters())
    names = gguf_tensor_map(cfg.n_layers)
    missing = sorted(set(params) - set(names.values()))
    if missing:
        raise ValueError(f"parameters {missing[:3]} have no GGUF name (expected a plain Phi-3/Phi-4 layout)")

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        add_hyperparameters(writer, cfg, gguf_type, name)
        add_tokenizer(writer, tokenizer)
        plan = {}
        for gname, ours in names.items():
            shape = tuple(params[ours].shape)
            qtype = plan[gname] = storage_type(gname, shape, gguf_type)
            nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
            # Logical shape: add_tensor_info reads it as a byte shape only when tensor_dtype is uint8.
            writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname, ours in names.items():
            writer.write_tensor_data(encode_tensor(params[ours], plan[gname]))
        writer.close()
    info = {"gguf": str(path), "gguf_type": gguf_type, "context_length": cfg.max_seq_len,
            "bytes": path.stat().st_size}
    if modelfile:
        info["modelfile"] = str(write_modelfile(path, cfg.max_seq_len))
    return info


# Ollama's Go template for our chat format: `<|im_start|>{role}<|im_sep|>{content}<|im_end|>` per message, nothing
# between turns, and the assistant header after a final non-assistant message (a final assistant message is left
# open, so Ollama continues it). `{{-` and `-}}` drop the template's own line breaks.
OLLAMA_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}
{{- if not (and $last (eq .Role "assistant")) }}<|im_end|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant<|im_sep|>{{ end }}
{{- end }}"""
OLLAMA_STOPS = ("<|im_end|>", "<|im_start|>", "<|im_sep|>", "<|endoftext|>")


def modelfile_text(gguf_name: str, context_length: int) -> str:
    """An Ollama Modelfile for a GGUF file in the same directory (Ollama resolves FROM against the Modelfile)."""
    stops = "\n".join(f'PARAMETER stop "{s}"' for s in OLLAMA_STOPS)
    return (f"# ollama create phi4-recipe -f Modelfile && ollama run phi4-recipe\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
            f"{stops}\n"
            f"PARAMETER num_ctx {context_length}\n")  # the trained context; Ollama's default is shorter


def write_modelfile(gguf_path: str | os.PathLike, context_length: int) -> Path:
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / MODELFILE
    atomic_write(out, modelfile_text(gguf_path.name, context_length))
    return out

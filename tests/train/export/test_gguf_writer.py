"""The GGUF writer (train/export/gguf.py): merges from our ranks, tensor encodings per type, the Modelfile, refusals."""
from __future__ import annotations

import gguf
import pytest
import torch

from data.tokenizer import NUM_BPE_RANKS, load_bpe_ranks
from model import ModelConfig, Transformer
from tests.helpers.gguf import CONTEXT
from train.export.gguf import (GGUF_TYPES, Q, bpe_vocab, byte_alphabet, encode_tensor, modelfile_text, storage_type,
                               to_gguf)
from train.export.run import main as export_main


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

"""Hugging Face interop: logits and loss-gradient parity with transformers' Phi3ForCausalLM in both directions,
sharded export, the 4.x and 5.x RoPE config keys, and clear refusals of what our model does not implement."""
import json
import re

import pytest
import torch

from model import ModelConfig, Transformer
from train.export.hf import config_from_hf, from_hf, hf_key_map, to_hf

transformers = pytest.importorskip("transformers")
from transformers import Phi3Config, Phi3ForCausalLM  # noqa: E402

# (dim, n_heads, n_kv_heads, ffn_dim, rope_theta): GQA ratios 2, 8 and 1 (MHA), 4, and non-default RoPE bases.
SHAPES = [
    (64, 4, 2, 96, 10_000.0),
    (64, 8, 1, 80, 250_000.0),
    (48, 4, 4, 128, 500.0),
    (96, 8, 2, 160, 10_000.0),
]
VOCAB, LAYERS, SEQ, BATCH = 512, 2, 24, 2
TOL = 1e-4


def our_config(dim, n_heads, n_kv_heads, ffn_dim, theta) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, dim=dim, n_layers=LAYERS, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       ffn_dim=ffn_dim, rope_theta=theta, max_seq_len=64)


def hf_model(dim, n_heads, n_kv_heads, ffn_dim, theta) -> Phi3ForCausalLM:
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=dim, intermediate_size=ffn_dim, num_hidden_layers=LAYERS,
                     num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, rope_theta=theta,
                     max_position_embeddings=64, original_max_position_embeddings=64, pad_token_id=None,
                     bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    return Phi3ForCausalLM(cfg)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random, norms included, so a swapped or misnamed tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        base = 1.0 if "norm" in name else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def inputs(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def assert_parity(ours: Transformer, hf: Phi3ForCausalLM, input_ids: torch.Tensor) -> None:
    """Logits, loss and every parameter gradient agree within TOL (fp32)."""
    ours.zero_grad(), hf.zero_grad()
    logits_ours, logits_hf = ours(input_ids), hf(input_ids).logits
    assert logits_ours.shape == logits_hf.shape == (BATCH, SEQ, VOCAB)
    assert (logits_ours - logits_hf).abs().max().item() <= TOL

    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]  # ours takes pre-shifted targets; HF shifts labels=input_ids itself
    loss_ours = ours(input_ids, labels=labels)
    loss_hf = hf(input_ids, labels=input_ids).loss
    assert abs(loss_ours.item() - loss_hf.item()) <= TOL
    loss_ours.backward(), loss_hf.backward()
    ours_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    key_map = hf_key_map(ours.cfg.n_layers)
    assert set(key_map) == set(hf_params) and set(key_map.values()) == set(ours_params)
    for hf_name, our_name in key_map.items():
        g_ours, g_hf = ours_params[our_name].grad, hf_params[hf_name].grad
        assert (g_ours - g_hf).abs().max().item() <= TOL, hf_name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-h{s[1]}-kv{s[2]}-theta{int(s[4])}")
def test_from_hf_parity(shape, tmp_path):
    hf = hf_model(*shape)
    randomize(hf, seed=1)
    hf.save_pretrained(tmp_path)  # transformers 5.x writes rope_parameters
    ours = from_hf(tmp_path)
    assert ours.cfg.rope_theta == shape[4] and ours.cfg.n_kv_heads == shape[2]
    assert_parity(ours, hf, inputs(seed=2))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-h{s[1]}-kv{s[2]}-theta{int(s[4])}")
def test_to_hf_parity(shape, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(our_config(*shape))
    randomize(ours, seed=3)
    to_hf(ours, tmp_path / "export")
    hf = Phi3ForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    assert hf.config.rope_parameters["rope_theta"] == shape[4]
    assert_parity(ours, hf, inputs(seed=4))


def test_sharded_export_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(our_config(*SHAPES[0]))
    randomize(ours, seed=5)
    out = tmp_path / "sharded"
    to_hf(ours, out, max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_key_map(LAYERS)) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())

    back = from_hf(out)
    for name, p in ours.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name
    hf = Phi3ForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert (hf(inputs(6)).logits - ours(inputs(6))).abs().max().item() <= TOL
    assert not list(tmp_path.glob(".*")), "temporary export directory left behind"


def test_export_config_and_dtype(tmp_path):
    # Full Phi-4 vocabulary (a thin model) so the bos/eos/pad ids are real rows.
    cfg = ModelConfig(vocab_size=100_352, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                      rope_theta=250_000.0, max_seq_len=16_384)
    ours = Transformer(cfg)
    out = tmp_path / "phi4-thin"
    to_hf(ours, out, dtype=torch.bfloat16)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Phi3ForCausalLM"] and hf_cfg["model_type"] == "phi3"
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (100257, 100265, 100349)
    assert hf_cfg["rope_theta"] == hf_cfg["rope_parameters"]["rope_theta"] == 250_000.0
    assert hf_cfg["max_position_embeddings"] == hf_cfg["original_max_position_embeddings"] == 16_384
    assert hf_cfg["sliding_window"] is None and hf_cfg["tie_word_embeddings"] is False
    assert hf_cfg["torch_dtype"] == "bfloat16" and hf_cfg["rms_norm_eps"] == 1e-5
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (100257, 100265, 100349)
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == 100265

    back = from_hf(out)
    assert back.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(back.output.weight, ours.output.weight.to(torch.bfloat16))
    assert from_hf(out, dtype=torch.float32).norm.weight.dtype == torch.float32
    assert from_hf(out, attn_backend="flash", doc_masking=False).cfg.attn_backend == "flash"
    with pytest.raises(ValueError, match="unknown ModelConfig override"):
        from_hf(out, not_a_field=1)


def test_export_with_tokenizer(tmp_path):
    from data.tokenizer import Phi4Tokenizer

    tok = Phi4Tokenizer()
    ours = Transformer(our_config(*SHAPES[0]))
    to_hf(ours, tmp_path / "with_tok", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "with_tok")
    messages = [{"role": "user", "content": "Hello there"}]
    assert list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)) \
        == tok.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_tok.model_max_length == 64


def test_export_refuses_existing_dir_and_overwrites(tmp_path):
    ours = Transformer(our_config(*SHAPES[0]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        to_hf(ours, out)
    assert (out / "precious.txt").read_text() == "keep me"
    to_hf(ours, out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing temporary left beside it


def _base_hf_config() -> dict:
    """A transformers 4.x style config, as released with microsoft/phi-4 (shrunk)."""
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": VOCAB, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 250_000, "rope_scaling": None,
        "max_position_embeddings": 64, "original_max_position_embeddings": 64, "sliding_window": None,
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # phi-4's ids do not fit a 512 vocab
    }


def test_rope_config_variants_load(tmp_path):
    ours = Transformer(our_config(*SHAPES[0]))
    to_hf(ours, tmp_path / "ckpt")
    v4 = _base_hf_config()  # rope_theta only
    v5 = {k: v for k, v in _base_hf_config().items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 250_000.0, "partial_rotary_factor": 1.0}
    for variant in (v4, v5):
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(variant))
        model = from_hf(tmp_path / "ckpt")
        assert model.cfg.rope_theta == 250_000.0 and model.cfg.n_kv_heads == 2
        hf = Phi3ForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
        assert (hf(inputs(7)).logits - model(inputs(7))).abs().max().item() <= TOL


@pytest.mark.parametrize("key, value, match", [
    ("sliding_window", 2047, "sliding_window=2047"),
    ("rope_scaling", {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "rope_scaling="),
    ("partial_rotary_factor", 0.75, "partial_rotary_factor=0.75"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 250_000.0}, "rope_parameters.rope_type='longrope'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10_000.0}, "rope_theta=250000 disagrees"),
    ("rope_parameters", {"rope_theta": 250_000.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("rope_theta", None, "no RoPE base"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True"),
    ("attention_bias", True, "attention_bias=True"),
    ("hidden_act", "gelu_new", "hidden_act='gelu_new'"),
    ("model_type", "llama", "model_type='llama'"),
    ("head_dim", 32, "head_dim=32"),
    ("hidden_size", None, "missing key 'hidden_size'"),
])
def test_unsupported_config_refused(key, value, match):
    hf = _base_hf_config()
    if value is None:
        hf.pop(key)
    else:
        hf[key] = value
    with pytest.raises(ValueError, match=re.escape(match)):
        config_from_hf(hf, "phi/config.json")


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)
    ours = Transformer(our_config(*SHAPES[0]))
    to_hf(ours, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"

    # A checkpoint whose tensors disagree with config.json.
    hf_cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**hf_cfg, "intermediate_size": 100}))
    shape_error = r"mlp\.(gate_up|down)_proj\.weight has shape \((192, 64|64, 96)\), expected \((200, 64|64, 100)\)"
    with pytest.raises(ValueError, match=shape_error):
        from_hf(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**hf_cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lacks 6 tensor"):
        from_hf(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**hf_cfg, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.1"):
        from_hf(ckpt)

    # Weights only as a pickle: refused, never unpickled.
    (ckpt / "config.json").write_text(json.dumps(hf_cfg))
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not read"):
        from_hf(ckpt)

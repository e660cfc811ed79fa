"""The GGUF files of the tiny model (every type) and transformers' reference outputs, built once per session."""
from __future__ import annotations

import pytest
import torch

from data.tokenizer import BOS_ID, EOS_ID
from tests.helpers.gguf import CHAT, LOGIT_TOL, PROMPTS, STOP_AFTER, make_it_stop, tiny_model
from train.export.gguf import to_gguf
from train.export.hf import to_hf
from train.export.run import main as export_main


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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

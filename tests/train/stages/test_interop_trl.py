"""Our DPO loss and our export against TRL itself: TRL's DPOTrainer loss (sigmoid and IPO) on our pairs, with a policy
and a reference model exported to Hugging Face (fp32, CPU), equals train/stages/dpo_loss.py on the same token ids;
SFTTrainer(assistant_only_loss=True) accepts the exported chat template, and trains on our loss mask."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

try:
    import datasets
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained
except ImportError as e:  # a dev dependency: missing, the interop check fails rather than skips
    raise ImportError("tests/train/stages/test_interop_trl.py needs TRL: pip install -e '.[dev]' (or pip install trl)"
                      ) from e

from data.pairs import PairBatches
from data.tokenizer import EOS_ID
from tests.helpers.models import tiny_model
from train.export.hf import to_hf
from train.stages.dpo_loss import completion_lengths, preference_loss, sequence_logps

pytestmark = pytest.mark.slow  # real TRL trainers (~50 s)


def _pairs(tok) -> list[dict]:
    """Chat-rendered prompts, completions of different lengths ending in <|im_end|>, as our DPO data holds them."""
    texts = [("What is 2+2?", "4", "It is five, I believe."), ("Name a colour.", "Blue is a colour.", "No."),
             ("Say hi.", "hi", "hello there, friend"), ("Count to three.", "1, 2, 3", "1, 2")]
    rows = []
    for q, good, bad in texts:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        rows.append({"prompt_ids": prompt, "chosen_ids": tok.encode(good) + [EOS_ID],
                     "rejected_ids": tok.encode(bad) + [EOS_ID]})
    return rows


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    policy, ref = tiny_model(3).eval(), tiny_model(4).eval()
    for name, m in (("policy", policy), ("ref", ref)):
        to_hf(m, root / name, tokenizer=tok, dtype=torch.float32)
    return root, policy, ref


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_trl_dpo_loss_equals_ours(tok, models, tmp_path, loss):
    root, policy, ref = models
    rows = _pairs(tok)
    beta = 0.1
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(root / "policy", dtype=torch.float32)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(root / "ref", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "policy")
    args = DPOConfig(output_dir=str(tmp_path / "out"), beta=beta, loss_type=[loss], per_device_train_batch_size=4,
                     report_to="none", use_cpu=True, bf16=False, fp16=False, precompute_ref_log_probs=False)
    texts = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])  # only to construct
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=texts, processing_class=hf_tok)
    inputs = trainer.data_collator(rows)  # TRL's own collator on our token ids
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, inputs))

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = PairBatches(path, seq_len=64, micro_batch=len(rows), global_batch=len(rows)).pairs_batch(
        list(range(len(rows))))
    with torch.no_grad():
        ours_policy, ours_ref = sequence_logps(policy, batch), sequence_logps(ref, batch)
    lengths = completion_lengths(batch)
    assert lengths.tolist() == [[len(r["chosen_ids"]), len(r["rejected_ids"])] for r in rows]
    losses, _ = preference_loss(ours_policy, ours_ref, beta, loss, lengths if loss == "ipo" else None)
    ours = float(losses.mean())
    assert abs(ours - (0.6931 if loss == "sigmoid" else 25.0)) > 1e-3  # the two models differ: not the h = 0 value
    print(f"\nTRL DPOTrainer vs ours, {loss}: loss {theirs:.8f} vs {ours:.8f}, |diff| {abs(theirs - ours):.2e}")
    assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-6)
    if loss == "ipo":  # and the pairs tell TRL's length-averaged IPO from the summed form
        ipo_sum = float(preference_loss(ours_policy, ours_ref, beta, "ipo_sum")[0].mean())
        assert abs(ipo_sum - theirs) > 1e-2


def test_trl_sft_accepts_the_export_for_assistant_only_loss(tok, models, tmp_path):
    root, _, _ = models
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "policy")
    assert has_generation_markers(hf_tok.chat_template)  # else SFTTrainer swaps in a template of its own
    assert is_chat_template_stop_token_trained(hf_tok)  # the assistant's <|im_end|> is trained on
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4 <|im_end|> ok"},
            {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, report_to="none", use_cpu=True,
                     bf16=False, fp16=False, max_length=128)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "policy", dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([{"messages": chat}]),
                         processing_class=hf_tok)
    assert trainer.chat_template is None  # our template was kept, not replaced by TRL's training template
    row = trainer.train_dataset[0]  # TRL's tokenized example: labels are -100 off the assistant mask
    ids, mask = tok.render_chat(chat)
    assert list(row["input_ids"]) == ids and list(row["labels"]) == [t if m else -100 for t, m in zip(ids, mask)]
    assert sum(mask) == len(tok.encode("4 <|im_end|> ok")) + len(tok.encode("6")) + 2  # both replies, both ends

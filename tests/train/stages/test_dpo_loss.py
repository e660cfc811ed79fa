"""train/stages/dpo_loss.py: completion lengths read off a packed pair batch, the IPO loss on averaged log-probs."""
from __future__ import annotations

import json

import pytest
import torch

from data.pairs import PairBatches
from train.stages.dpo_loss import completion_lengths, preference_loss


def test_completion_lengths_are_each_sides_token_count(tmp_path):
    rows = [{"prompt_ids": [100264, 882, 100266, 5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
            {"prompt_ids": [100264, 882, 100266, 11], "chosen_ids": [12], "rejected_ids": [13, 14, 15, 16]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pb = PairBatches(path, seq_len=32, micro_batch=2, global_batch=2, held_out_fraction=0.0)
    batch = pb.pairs_batch([0, 1])
    assert completion_lengths(batch).tolist() == [[3.0, 1.0], [1.0, 4.0]]


def test_ipo_is_length_normalised_and_ipo_sum_is_not():
    policy, reference = torch.tensor([[-6.0, -2.0]]), torch.tensor([[-9.0, -1.0]])
    lengths = torch.tensor([[3.0, 1.0]])
    ipo, _ = preference_loss(policy, reference, beta=0.25, kind="ipo", lengths=lengths)
    ipo_sum, _ = preference_loss(policy, reference, beta=0.25, kind="ipo_sum")
    h_avg = (-2.0 - -2.0) - (-3.0 - -1.0)  # 2.0
    h_sum = (-6.0 - -2.0) - (-9.0 - -1.0)  # 4.0
    assert ipo.item() == pytest.approx((h_avg - 2.0) ** 2) and ipo_sum.item() == pytest.approx((h_sum - 2.0) ** 2)

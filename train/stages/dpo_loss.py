"""DPO's numbers: sequence log-probs of packed pair rows, and the sigmoid (DPO) and IPO preference losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """(num_pairs, 2) summed log-probs of each pair's chosen (column 0) and rejected (column 1) completion."""
    nll = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"], reduction="none")  # (R, T)
    slot = batch["seq_slot"]  # (R, T): 2 j + side at completion targets, -1 elsewhere
    keep = slot >= 0
    n = int(batch["num_pairs"])
    out = torch.zeros(2 * n, dtype=torch.float32, device=nll.device)
    return out.index_add(0, slot[keep], -nll[keep].float()).view(n, 2)


LOSSES = ("sigmoid", "ipo", "ipo_sum")


def completion_lengths(batch: dict) -> torch.Tensor:
    """(num_pairs, 2) labelled tokens of each pair's chosen and rejected completion."""
    slot = batch["seq_slot"]
    keep = slot >= 0
    n = int(batch["num_pairs"])
    ones = torch.ones(int(keep.sum()), dtype=torch.float32, device=slot.device)
    return torch.zeros(2 * n, dtype=torch.float32, device=slot.device).index_add(0, slot[keep], ones).view(n, 2)


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, kind: str = "sigmoid",
                    lengths: torch.Tensor | None = None):
    """Per-pair losses (N,) and summed stats, from (N, 2) policy and reference log-probs [chosen, rejected].

    h = (log pi_c - log pi_r) - (log ref_c - log ref_r). sigmoid (Rafailov et al.): -log sigmoid(beta h) on summed
    log-probs. ipo (Azar et al., as TRL computes it): (h - 1 / (2 beta))^2 on log-probs averaged over each
    completion's tokens (`lengths`, (N, 2)); ipo_sum: the same on summed log-probs (an older variant, kept by name).
    Rewards are beta (log pi - log ref) per side on the log-probs the loss uses; accuracy counts pairs whose
    chosen reward is the higher.
    """
    if kind == "ipo":
        if lengths is None:
            raise ValueError("dpo.loss=ipo averages log-probs over each completion: pass lengths")
        policy, reference = policy / lengths, reference / lengths
    h = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind in ("ipo", "ipo_sum"):
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss={kind!r}; expected one of {list(LOSSES)}")
    with torch.no_grad():
        chosen = beta * (policy[:, 0] - reference[:, 0])
        rejected = beta * (policy[:, 1] - reference[:, 1])
        stats = {"rewards_chosen": chosen.sum(), "rewards_rejected": rejected.sum(),
                 "rewards_margin": (chosen - rejected).sum(), "rewards_accuracy": (chosen > rejected).float().sum(),
                 "logps_chosen": policy[:, 0].sum(), "logps_rejected": policy[:, 1].sum()}
    return losses, stats

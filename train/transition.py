"""What a stage inherits from the weights it starts from (`train.init_from`): RoPE theta and the context.

The rule (the recipe's dry run checks the same one over the whole chain): only a `stage: midtrain` run may change
`model.rope_theta` or grow `model.max_seq_len` beyond the longest context its weights were trained at (Phi-4 report
§3.3: the switch to 16K and theta 250K is midtraining's). Any other stage doing so is refused before any compute; a
midtrain stage's changes are logged. A shorter context than the source's (SFT rows of 4K after 16K midtraining) is
fine. Checkpoints record the longest context trained so far (`context` in meta.json), so the rule holds along a
chain: DPO at 16K after SFT at 4K after midtraining at 16K.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from train.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def source_context(init_from: str) -> dict:
    """{rope_theta, max_seq_len, longest_trained, recorded, source} of an HF directory or a checkpoint / run dir."""
    path = Path(init_from)
    if (path / "config.json").is_file():
        hf = json.loads((path / "config.json").read_text())
        n = int(hf.get("max_position_embeddings") or 0)  # 0 / None: unknown (the loader reports a broken config)
        theta = hf.get("rope_theta")
        return {"rope_theta": float(theta) if theta else None, "max_seq_len": n, "longest_trained": n,
                "recorded": n > 0, "source": str(path)}
    from train.checkpoint import resolve_checkpoint_dir

    tag_dir, meta = resolve_checkpoint_dir(path, verify_files=False)  # the trainer verifies when it loads
    model = meta.get("config", {}).get("model", {})
    ctx = meta.get("context") or {}
    n = int(model.get("max_seq_len", 0))
    return {"rope_theta": float(model.get("rope_theta", 10000.0)), "max_seq_len": n,
            "longest_trained": int(ctx.get("longest_trained", n)), "recorded": "longest_trained" in ctx,
            "source": str(tag_dir)}


def check_transition(cfg: RunConfig) -> dict:
    """The context record of a run starting from `train.init_from` (ConfigError when the rule above is broken):
    {longest_trained, rope_theta, from, changes}."""
    theta, n = float(cfg.model.rope_theta), int(cfg.model.max_seq_len)
    if not cfg.train.init_from:
        return {"longest_trained": n, "rope_theta": theta, "from": "", "changes": []}
    src = source_context(cfg.train.init_from)
    changes, problems = [], []
    if src["rope_theta"] is not None and abs(src["rope_theta"] - theta) > 1e-6 * max(theta, 1.0):
        changes.append(f"rope_theta {src['rope_theta']:g} -> {theta:g}")
        if cfg.stage != "midtrain":
            problems.append(f"model.rope_theta={theta:g} but the weights were trained with {src['rope_theta']:g}")
    if n > src["longest_trained"] and (src["recorded"] or src["longest_trained"] > 0):
        changes.append(f"max_seq_len {src['longest_trained']:,} -> {n:,}")
        if cfg.stage != "midtrain":
            if src["recorded"]:
                problems.append(f"model.max_seq_len={n:,} exceeds the longest context the weights were trained at "
                                f"({src['longest_trained']:,})")
            else:  # a checkpoint from before contexts were recorded: its chain is unknown
                log.warning("init_from %s records no longest context; max_seq_len %s > its %s is allowed unchecked",
                            src["source"], f"{n:,}", f"{src['longest_trained']:,}")
    if problems:
        raise ConfigError(f"train.init_from={cfg.train.init_from} (stage {cfg.stage}): " + "; ".join(problems)
                          + ". Only a `stage: midtrain` run changes RoPE theta or grows the context (Phi-4 §3.3); "
                          "set the source's values, or make this stage the midtraining one")
    for c in changes:
        log.info("stage %s from %s: %s (a midtrain stage)", cfg.stage, src["source"], c)
    return {"longest_trained": max(n, src["longest_trained"]), "rope_theta": theta, "from": src["source"],
            "changes": changes}

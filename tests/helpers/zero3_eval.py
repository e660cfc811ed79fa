"""One rank of the ZeRO-3 in-loop evaluation test (tests/train/eval/test_run.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.helpers.zero3_eval RUN_YAML EVAL_YAML OUT

It builds the trainer's engine under ZeRO-3, evaluates the engine's (partitioned) module, then the same weights
gathered into a plain Transformer, and writes both flat metric dicts to OUT/rank{rank}.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_yaml: str, eval_yaml: str, out_dir: str) -> None:
    import deepspeed
    import torch

    from data.tokenizer import Phi4Tokenizer
    from model.transformer import Transformer
    from train.config import load_config
    from train.distributed import init_distributed
    from train.engine import build_engine, build_model, deepspeed_config
    from train.eval.config import EvalConfig
    from train.eval.run import evaluate

    cfg = load_config(run_yaml, ["deepspeed.zero_stage=3"])
    dist_state = init_distributed(cfg.train.device, cfg.train.precision)
    ds = deepspeed_config(cfg, dist_state.world_size, dist_state.precision)
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, build_model(cfg.model, ds, dist_state), ds)
    eval_cfg = load_config(eval_yaml, schema=EvalConfig)
    tok = Phi4Tokenizer()
    result = {"zero3": evaluate(engine.module, tok, eval_cfg, dist_state.device)}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    plain = Transformer(cfg.model)
    plain.load_state_dict(full)
    result["plain"] = evaluate(plain, tok, eval_cfg, dist_state.device)
    (Path(out_dir) / f"rank{dist_state.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])

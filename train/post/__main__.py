"""python -m train.post CONFIG [key=value ...] [policy_model=DIR]

The post-training data builders (data/post/run.py): judged SFT responses, judge-guided DPO pairs, refusal-to-
hallucinate SFT examples and 5-token DPO pairs, safety SFT examples and pairs. `make: [sft]` writes only what SFT
reads (run it before SFT, the policy being the base model), `make: [dpo]` only the DPO files (after SFT, the policy
being the SFT model). `policy_model=<checkpoint or HF dir>` (the recipe passes its previous training stage) sets an
in-process policy's weights; a served policy is yours to point at that checkpoint. Exit 2: a config or input
problem; exit 3: a server did not answer (finished requests are kept in requests.<role>.jsonl)."""
from __future__ import annotations

import asyncio
import sys

from data.configfile import ConfigError
from data.fileio import JsonlError
from data.post.config import ROLES, load_post_config
from data.post.run import run
from data.synth.backend import ServerUnavailable
from data.tokenizer import Phi4Tokenizer
from train.synth.backends import make_backend


async def _run(cfg, make):
    backends, made = {}, {}
    for role in ROLES:
        b = cfg.role(role)
        key = repr(b)  # roles with the same backend config share one backend (one model in memory)
        if key not in made:
            made[key] = make_backend(b)
        backends[role] = made[key]
    try:
        return await run(cfg, backends, Phi4Tokenizer(), make)
    finally:
        for b in made.values():
            if hasattr(b, "close"):
                await b.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    rest = argv[1:]
    try:
        policy_model = [a for a in rest if a.startswith("policy_model=")]
        rest = [a for a in rest if not a.startswith("policy_model=")]
        cfg = load_post_config(argv[0], rest)
        if policy_model:
            value = policy_model[-1].split("=", 1)[1]
            if cfg.policy.kind == "inprocess":
                cfg.policy.inprocess.model = value
            else:
                print(f"[post] policy_model={value} not used: the policy is {cfg.policy.kind or 'the generator'}; "
                      "serve that checkpoint where policy.openai.base_url points")
        asyncio.run(_run(cfg, tuple(cfg.make)))
        return 0
    except (ConfigError, JsonlError, FileNotFoundError, ValueError) as e:
        print(f"train.post: {e}", file=sys.stderr)
        return 2
    except ServerUnavailable as e:
        print(f"train.post: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

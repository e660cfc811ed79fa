"""python -m train.synth CONFIG [key=value ...] [--shard I/N | --merge N]

Without a flag: the whole run in this process (shard 0 of 1, then the merge). `--shard I/N` generates one shard (a
Slurm array task: slurm/synth.sbatch); `--merge N` deduplicates all N shards into the final files (the afterok job).
A finished shard is skipped; an interrupted one resumes from its request log. Exit 2: a config or input problem;
exit 3: the LLM server did not answer (finished requests are kept)."""
from __future__ import annotations

import asyncio
import sys

from data.arrays import split_array_flags
from data.configfile import ConfigError
from data.fileio import JsonlError
from data.synth.backend import ServerUnavailable
from data.synth.config import SynthConfig, load_synth_config
from data.synth.pipeline import merge, run_shard
from train.synth.backends import make_backend


async def _generate(cfg: SynthConfig, shard: int, num_shards: int) -> dict:
    backend = make_backend(cfg.backend)
    try:
        return await run_shard(cfg, backend, shard, num_shards)
    finally:
        if hasattr(backend, "close"):
            await backend.close()


def parse_args(argv: list[str]) -> tuple[str, list[str], tuple[int, int] | None, int | None]:
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    try:
        rest, shard, merge_n = split_array_flags(argv[1:])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return argv[0], rest, shard, merge_n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, overrides, shard, merge_n = parse_args(argv)
        cfg = load_synth_config(config, overrides)
        if merge_n:
            merge(cfg, merge_n)
            return 0
        i, n = shard or (0, 1)
        asyncio.run(_generate(cfg, i, n))
        if shard is None:
            merge(cfg, 1)
        return 0
    except (ConfigError, JsonlError, FileNotFoundError, ValueError) as e:
        print(f"train.synth: {e}", file=sys.stderr)
        return 2
    except ServerUnavailable as e:
        print(f"train.synth: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

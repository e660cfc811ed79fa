"""The array flags every shardable entry point takes: `--shard I/N` (one task of a Slurm array) or `--merge N` (the
job after them). data.prepare, data.decontaminate, train.synth and train.pts parse them here, so they mean the same."""
from __future__ import annotations


def split_array_flags(args: list[str]) -> tuple[list[str], tuple[int, int] | None, int | None]:
    """(the other arguments, (I, N) or None, N or None); ValueError naming the flag for a bad value or both flags."""
    rest, shard, merge_n = [], None, None
    it = iter(args)
    for a in it:
        if a not in ("--shard", "--merge"):
            rest.append(a)
            continue
        value = next(it, "")
        i, sep, n = value.partition("/")
        if a == "--shard" and sep and i.isdigit() and n.isdigit() and int(i) < int(n):
            shard = (int(i), int(n))
        elif a == "--merge" and value.isdigit() and int(value) >= 1:
            merge_n = int(value)
        else:
            raise ValueError(f"{a} {value}: expected {'I/N with 0 <= I < N' if a == '--shard' else 'N >= 1'}")
    if shard and merge_n:
        raise ValueError("--shard and --merge are separate jobs; give one")
    return rest, shard, merge_n

"""Per-rank memory of the pretraining loader's per-document state: the full in-RAM permutation (old) vs the
memory-mapped state with the block-wise order (data/docstate.py), on simulated sources of 1e6, 1e7 (, 1e8) documents.

`python -m train.bench.docstate [--docs 1e6 1e7 1e8] [--json out.json]`. Each source is a real shard directory:
a numpy-written uint64 index (the real 8 bytes per document on disk) and a sparse token file (no disk blocks),
so the loader reads it like any prepared source. Every measurement runs in a fresh interpreter:
- old: `MixtureLoader` with the full permutation (what every source used before);
- new build: the first rank, which builds the state (the only O(documents) step, once per source and selection);
- new rank: any later rank, mapping that state.
Each then reads across two epoch boundaries; `boundary ms` is the read that crosses into epoch 2 (the cost a
training step pays there). RSS is from /proc/self/status after that read: anon (private memory; growth over the
interpreter with torch imported) and file (mapped file pages, reclaimable page cache), plus VmHWM (peak).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 4096
MAX_DOC_TOKENS = 64  # short documents keep the sparse token file small; the per-document state does not care


def synthetic_index_source(out: Path, n_docs: int, seed: int = 0) -> Path:
    """A one-shard source of n_docs documents of 1..64 tokens: a real index file and a sparse token file."""
    out.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(n_docs + 1, dtype="<u8")
    rng = np.random.default_rng(seed)
    chunk = 1 << 24
    for lo in range(0, n_docs, chunk):  # in chunks: ~8 bytes per document of memory at most
        hi = min(lo + chunk, n_docs)
        np.cumsum(rng.integers(1, MAX_DOC_TOKENS + 1, hi - lo, dtype=np.uint64), out=offsets[lo + 1:hi + 1])
        offsets[lo + 1:hi + 1] += offsets[lo]
    n_tokens = int(offsets[-1])
    offsets.tofile(out / "shard_00000.idx")
    del offsets
    with open(out / "shard_00000.bin", "wb") as f:
        f.truncate(4 * n_tokens)  # sparse: zeros, no blocks on disk
    manifest = {"format": 1, "name": "bench", "provenance": "organic", "tokenizer": "bench", "dtype": "uint32",
                "num_docs": n_docs, "num_tokens": n_tokens,
                "shards": [{"tokens": "shard_00000.bin", "index": "shard_00000.idx", "num_docs": n_docs,
                            "num_tokens": n_tokens, "tokens_sha256": f"sparse-{n_docs}-{seed}",
                            "index_sha256": f"synthetic-{n_docs}-{seed}"}]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def proc_status() -> dict:
    """Memory of this process in MiB (Linux /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def child(mode: str, source: str, state_dir: str) -> dict:
    """One rank: build the loader, read across the epoch boundaries, report times and memory."""
    from data.config import DataConfig, SourceConfig
    from data.loader import MixtureLoader

    base = proc_status()
    cfg = DataConfig(sources=[SourceConfig(name="bench", path=source, weight=1.0)])
    t0 = time.perf_counter()
    ld = MixtureLoader(cfg, SEQ_LEN, 1, 1, state_dir=state_dir,
                       blocked_min_docs=sys.maxsize if mode == "old" else 1)
    init_s = time.perf_counter() - t0
    st, out = ld.streams[0], np.empty(SEQ_LEN + 1, dtype=np.int64)
    L = st.epoch_tokens
    st.read(L - SEQ_LEN // 2, SEQ_LEN + 1, out)  # epochs 0 and 1 (as after a resume there)
    t0 = time.perf_counter()
    st.read(2 * L - SEQ_LEN // 2, SEQ_LEN + 1, out)  # into epoch 2: what a training step pays at a boundary
    boundary_s = time.perf_counter() - t0
    mem = proc_status()
    return {"mode": mode, "init_s": init_s, "boundary_ms": 1000 * boundary_s,
            "anon_mib": mem["RssAnon"] - base["RssAnon"], "file_mib": mem["RssFile"], "peak_mib": mem["VmHWM"], "base_anon_mib": base["RssAnon"]}


def run_child(mode: str, source: Path, state_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "train.bench.docstate", "--child", mode, str(source), str(state_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(sizes: list[int], tmp: Path) -> list[dict]:
    results = []
    for n in sizes:
        src = synthetic_index_source(tmp / f"src_{n}", n)
        row = {"docs": n}
        row["old"] = run_child("old", src, tmp / f"state_{n}")
        row["build"] = run_child("new", src, tmp / f"state_{n}")  # the first rank builds the state
        row["rank"] = run_child("new", src, tmp / f"state_{n}")  # every later rank maps it
        row["state_disk_mib"] = sum(p.stat().st_size for p in (tmp / f"state_{n}").rglob("*.npy")) / 2**20
        results.append(row)
        print(format_row(row), flush=True)
        for p in sorted(tmp.rglob("*"), reverse=True):  # free the disk before the next size
            p.unlink() if p.is_file() else p.rmdir()
    return results


HEAD = (f"{'docs':>6} | {'old: init s':>11} {'boundary ms':>11} {'anon MiB':>9} {'peak MiB':>9} | "
        f"{'new build s':>11} {'peak MiB':>9} | {'new rank init s':>15} {'boundary ms':>11} {'anon MiB':>9} "
        f"{'file MiB':>9} | {'state MiB':>9}")


def format_row(r: dict) -> str:
    o, b, k = r["old"], r["build"], r["rank"]
    return (f"{r['docs']:>6.0e} | {o['init_s']:>11.2f} {o['boundary_ms']:>11.1f} {o['anon_mib']:>9.0f} "
            f"{o['peak_mib']:>9.0f} | {b['init_s']:>11.2f} {b['peak_mib']:>9.0f} | {k['init_s']:>15.2f} "
            f"{k['boundary_ms']:>11.1f} {k['anon_mib']:>9.0f} {k['file_mib']:>9.0f} | {r['state_disk_mib']:>9.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.bench.docstate", description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=float, nargs="+", default=[1e6, 1e7],
                    help="simulated documents per source (1e8: ~2.2 GB of disk and ~5 GB of RAM for the old path)")
    ap.add_argument("--tmp", default=None, help="folder for the simulated sources (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SOURCE", "STATE_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    from train.bench.timing import machine_facts

    print(json.dumps(machine_facts()))
    print("anon: private RSS growth over the interpreter (torch imported); file: mapped pages (page cache)")
    print(HEAD)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        results = bench([int(n) for n in args.docs], Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

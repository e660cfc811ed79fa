"""Throughput and overhead of the synthetic-data pipeline against a real OpenAI-compatible server.

    python -m train.bench.synth [--concurrency 32] [--seeds 64] [--max-tokens 16] [--profile] [--json out.json]
    python -m train.bench.synth --base-url http://gpu-node:8000/v1 --model phi-4   # a running server (vLLM, ...)

Without --base-url it writes a GGUF of a tiny random model (dim 32, the full 100,352 vocabulary) and starts
llama.cpp's server (`python -m llama_cpp.server`, --server-threads threads) on 127.0.0.1. The workload is generated
seed text (--seeds passages of ~300 characters) through the pipeline of one shard, in this process, with every
request sent for real: rewrites (textbook + exercises, kept even when cut by max_tokens), critiques of the exercises
(JSON mode), one synthetic question per seed and --answers answers to each (temperature 0.8, seeded). Reversal is off:
its cost is the sandbox's (`python -m train.bench.oracle`), not the request path's. Greedy decoding elsewhere
(temperature 0, `repeat_penalty: 1.0` for llama.cpp).

Printed: records/s and requests/s over the shard's wall time; the pipeline's overhead = 1 - busy_s / wall_s, where
busy_s is the client's wall time with at least one request in flight (so the overhead is the time the server could
have been answering but had nothing to answer: reading seeds, building each step's requests, parsing answers between
steps, writing outputs); the idle gaps that make it up, longest first, with where they fall; and the client's CPU
time per request (everything this process does per request: prompt rendering, the openai client and httpx, JSON,
the request log), with the request rate one core could drive at that cost. Target: overhead < 5% at 32 concurrent.
--profile adds cProfile's top functions of the client process during the shard, in CPU time (by own time, then
cumulative);
the profiler itself roughly doubles the client's CPU time, so read its shares, not its seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import data.synth.pipeline as pipeline
from data.fileio import atomic_write
from data.synth.backend import OpenAIBackend, chat
from data.synth.client import Client
from data.synth.config import SynthConfig

OVERHEAD_TARGET = 0.05
WORDS = ("a force applied to a body changes its momentum at a rate equal to the force so a heavier cart needs a "
         "larger push to reach the same speed in the same time while friction takes part of the work and turns "
         "it into heat which is why the wheels warm as they roll").split()


def cpu_info() -> dict:
    """model name and cpu family of the first processor in /proc/cpuinfo."""
    info = {"model_name": "unknown", "cpu_family": "unknown"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().replace(" ", "_")
            if key in info and info[key] == "unknown":
                info[key] = value.strip()
            if not line.strip():  # end of the first processor
                break
    except OSError:
        pass
    return {**info, "cores": len(os.sched_getaffinity(0)), "loadavg": [round(x, 2) for x in os.getloadavg()]}


# ---- the server ----------------------------------------------------------------------------------------------------

def served_models(base_url: str, timeout_s: float = 10) -> list[str]:
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/models", timeout=timeout_s) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


def start_llama_server(folder: Path, threads: int, context: int) -> tuple[subprocess.Popen, str, str]:
    """A tiny random model as GGUF, served by llama_cpp.server on a free port: (process, base_url, model name)."""
    import torch

    from data.tokenizer import VOCAB_SIZE, Phi4Tokenizer
    from model import ModelConfig, Transformer
    from train.export.gguf import to_gguf

    cfg = ModelConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=context)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    gguf = folder / "bench-f32.gguf"
    to_gguf(model, gguf, "f32", tokenizer=Phi4Tokenizer())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")  # noqa: SIM115 (the child holds it; closed with the folder)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_ctx", str(context), "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}: "
                               f"{(folder / 'server.log').read_text()[-2000:]}")
        try:
            return proc, base_url, served_models(base_url, 2)[0]
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("llama_cpp.server not ready after 120 s") from None
            time.sleep(0.25)


# ---- the workload ------------------------------------------------------------------------------------------------

def seed_file(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for k in range(n):
            text = " ".join(WORDS[(k * 11 + i) % len(WORDS)] for i in range(55)) + f" (passage {k})."
            f.write(json.dumps({"text": text}) + "\n")
    return path


def bench_config(args, out: Path, seeds: Path, base_url: str, model: str) -> SynthConfig:
    cfg = SynthConfig(output_dir=str(out), name="bench")
    cfg.backend.kind = "openai"
    cfg.backend.concurrency = args.concurrency
    o = cfg.backend.openai
    o.base_url, o.model, o.timeout_s, o.max_retries = base_url, model, 600.0, 2
    o.extra_body = {"repeat_penalty": 1.0} if args.llama_cpp else {}
    cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_tokens = 0.0, 1.0, args.max_tokens
    s = cfg.seeds
    s.inputs, s.passage_chars, s.min_chars, s.score = [str(seeds)], 400, 100, "none"
    cfg.rewrite.styles, cfg.rewrite.drop_truncated = ["textbook", "exercises"], False
    cfg.revision.styles, cfg.revision.rounds, cfg.revision.max_tokens = ["exercises"], 1, args.max_tokens
    q = cfg.questions
    q.synthetic_per_seed, q.answers, q.question_max_tokens = 1, args.answers, args.max_tokens
    cfg.reversal.enabled = False
    cfg.dedup.near = False  # merge is not timed; the shard is
    cfg.validate()
    return cfg


class GapClient(Client):
    """The pipeline's Client, also recording each interval with no request in flight: (start, end) since t0."""
    t0 = 0.0
    gaps: list[tuple[float, float]] = []
    _idle_since = 0.0

    def _start(self) -> None:
        if self._in_flight == 0:
            now = time.perf_counter()
            GapClient.gaps.append((GapClient._idle_since - GapClient.t0, now - GapClient.t0))
        super()._start()

    def _end(self, n: int = 1) -> None:
        super()._end(n)
        if self._in_flight == 0:
            GapClient._idle_since = time.perf_counter()


async def run_once(cfg: SynthConfig, prof: cProfile.Profile | None = None) -> dict:
    backend = OpenAIBackend(cfg.backend.openai)
    try:  # one request first: connections, the server's first-request costs
        await backend.complete(chat("warm up", max_tokens=2, temperature=0.0))
        GapClient.gaps, GapClient.t0 = [], time.perf_counter()
        GapClient._idle_since = GapClient.t0
        cpu0 = time.process_time()
        if prof:
            prof.enable()
        manifest = await pipeline.run_shard(cfg, backend, log=lambda msg: None)
        if prof:
            prof.disable()
        wall_s, cpu_s = time.perf_counter() - GapClient.t0, time.process_time() - cpu0
    finally:
        await backend.close()
    GapClient.gaps.append((GapClient._idle_since - GapClient.t0, wall_s))  # after the last answer to the end
    return {"manifest": manifest, "wall_s": wall_s, "cpu_s": cpu_s, "gaps": GapClient.gaps}


def bench(args) -> dict:
    res = {"cpu": cpu_info(), "args": {k: v for k, v in vars(args).items() if k != "json"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc = None
        if args.base_url:
            base_url, model = args.base_url, args.model or served_models(args.base_url)[0]
        else:
            proc, base_url, model = start_llama_server(tmp, args.server_threads, args.context)
        try:
            cfg = bench_config(args, tmp / "out", seed_file(tmp / "seeds.jsonl", args.seeds), base_url, model)
            pipeline.Client = GapClient  # the shard's client, with its idle gaps recorded
            # CPU time, not wall: on a shared machine a wall-clock profile charges the time this process waits for a
            # core to whatever call it was in (loopback send() wakes the server and loses the core to it).
            prof = cProfile.Profile(time.process_time) if args.profile else None  # the shard, after the warm-up
            run = asyncio.run(run_once(cfg, prof))
            if prof:
                buf = io.StringIO()
                for key in ("tottime", "cumulative"):
                    pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.profile_top)
                res["profile"] = buf.getvalue()
            responses = [json.loads(line)["response"] for line in
                         (pipeline.shard_dir(cfg, 0, 1) / "requests.jsonl").read_text().splitlines()]
        finally:
            pipeline.Client = Client
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    m = run["manifest"]
    sent, records = m["requests"]["sent"], sum(m["records"].values())
    busy_s, wall_s = m["busy_s"], run["wall_s"]
    res.update({
        "server": {"base_url": base_url, "model": model, "started_here": proc is not None},
        "requests": sent, "errors": sum(bool(r["error"]) for r in responses), "records": records,
        "completion_tokens": sum(r["completion_tokens"] for r in responses),
        "wall_s": wall_s, "busy_s": busy_s, "client_cpu_s": run["cpu_s"],
        "records_per_s": records / wall_s, "requests_per_s": sent / wall_s,
        "overhead": 1 - busy_s / wall_s,
        "client_cpu_ms_per_request": 1000 * run["cpu_s"] / max(sent, 1),
        "mean_request_s": sum(r["seconds"] for r in responses) / max(len(responses), 1),
        "gaps": sorted(run["gaps"], key=lambda g: g[0] - g[1])[:args.gaps], "steps": m["steps"],
    })
    res["gaps_total_s"] = sum(b - a for a, b in run["gaps"])
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def summary(r: dict) -> str:
    c, a = r["cpu"], r["args"]
    ok = r["overhead"] < OVERHEAD_TARGET
    lines = [
        f"machine: {c['model_name']} (cpu family {c['cpu_family']}), {c['cores']} cores, load average "
        f"{c['loadavg']} -> {r['loadavg_end']}",
        f"server: {r['server']['model']} at {r['server']['base_url']}"
        + (f" (llama_cpp.server started here, {a['server_threads']} thread(s), tiny random model)"
           if r["server"]["started_here"] else ""),
        f"workload: {a['seeds']} seeds -> {r['requests']} requests ({r['errors']} refused), {r['records']} records, "
        f"{r['completion_tokens']} completion tokens; concurrency {a['concurrency']}, max_tokens {a['max_tokens']}",
        f"throughput: {r['records_per_s']:.2f} records/s, {r['requests_per_s']:.1f} requests/s "
        f"(wall {r['wall_s']:.2f} s, mean request latency at the client {1000 * r['mean_request_s']:.0f} ms)",
        f"pipeline overhead: 1 - busy/wall = 1 - {r['busy_s']:.3f}/{r['wall_s']:.3f} = {100 * r['overhead']:.2f}% "
        f"({'target met' if ok else 'TARGET NOT MET'}, < {100 * OVERHEAD_TARGET:.0f}%); idle gaps total "
        f"{r['gaps_total_s']:.3f} s",
        "  longest idle gaps (s since start: no request in flight): "
        + ", ".join(f"{g0:.2f}-{g1:.2f} ({1000 * (g1 - g0):.0f} ms)" for g0, g1 in r["gaps"]),
        f"client CPU: {r['client_cpu_s']:.2f} s = {r['client_cpu_ms_per_request']:.2f} ms per request (one core "
        f"drives at most {1000 / r['client_cpu_ms_per_request']:,.0f} requests/s at this cost)",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.bench.synth", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", help="a running OpenAI-compatible server (default: start llama_cpp.server here)")
    p.add_argument("--model", help="the served model name (default: the first of GET /v1/models)")
    p.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                   help="send llama.cpp's repeat_penalty 1.0 (default: when the server is started here)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seeds", type=int, default=64, help="generated seed passages")
    p.add_argument("--answers", type=int, default=5, help="answers per question (>= 3)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--context", type=int, default=1024, help="the started server's context length")
    p.add_argument("--gaps", type=int, default=6, help="idle gaps to list")
    p.add_argument("--profile", action="store_true", help="cProfile the client process")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("concurrency", "seeds", "max_tokens", "server_threads", "context"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.answers < 3:
        p.error("--answers must be >= 3 (a plurality needs three samples)")
    if args.model and not args.base_url:
        p.error("--model names a model of a running server: give --base-url too")
    if args.llama_cpp is None:
        args.llama_cpp = not args.base_url
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    res = bench(args)
    if "profile" in res:
        print(f"--- profile: client process during the shard, by own time, then cumulative ---\n{res['profile']}")
    print(summary(res))
    if args.json:
        atomic_write(args.json, json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pipeline over one shard, and the merge of all shards.

Shard i of N: seeds (split, scored, kept) -> rewrites -> self-revision -> plurality-filtered questions -> instruction
reversal for code -> decontamination of every record -> `<output_dir>/shards/<i>-of-<N>/`: one jsonl per dataset type,
`seeds.jsonl` (the kept seeds with their scores and locations), `manifest.json`, then the `DONE` marker. Every request
goes through the shard's request log (`requests.jsonl`), so a rerun of a killed shard sends only what had not finished.

Merge (after every shard is DONE): the records of all shards sorted by id (so the output does not depend on the shard
count), exact and near duplicates removed across shards (the first by id survives), into
`<output_dir>/<name>.<dataset_type>.jsonl` (what data.prepare reads) and `<output_dir>/manifest.json`: counts per step
(in / kept / dropped by reason), per dataset type, and per shard.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from data.contamination import Decontaminator
from data.decontaminate import load_benchmarks
from data.fileio import atomic_path, atomic_write
from data.synth.client import Client, RequestLog
from data.synth.config import SynthConfig
from data.synth.context import Context
from data.synth.dedup import Deduper
from data.synth.parse import first_json_object, score_fields
from data.synth.plurality import question_records
from data.synth.records import Tally
from data.synth.reversal import reversal_records
from data.synth.revision import revise
from data.synth.seeds import SCORE_NAMES, SeedClassifier, passages

DATASET_TYPES = ("web_rewrite", "qa", "code_reversal")


def shard_dir(cfg: SynthConfig, shard: int, num_shards: int) -> Path:
    return Path(cfg.output_dir) / "shards" / f"{shard:05d}-of-{num_shards:05d}"


async def score_seeds(ctx: Context) -> list[dict]:
    """This shard's passages as seed dicts {id, text, location, scores}, the ones below the thresholds dropped."""
    s = ctx.cfg.seeds
    ctx.tally.count("seeds")
    chosen, seen = [], 0
    for p in passages(s.inputs, s.text_field, s.passage_chars, ctx.shard, ctx.num_shards):
        if s.max_passages and seen >= s.max_passages:
            break
        seen += 1
        if len(p.text) < s.min_chars:
            ctx.tally.drop("seeds", "too_short")
            continue
        chosen.append({"id": f"seed:{p.sha256[:16]}:{p.index}", "text": p.text, "location": p.location()})
    if s.score == "none":
        for seed in chosen:
            seed["scores"] = {}
        ctx.tally.keep("seeds", len(chosen))
        return chosen
    if s.score == "classifier":
        clf = SeedClassifier(s.classifier)
        for seed in chosen:
            seed["scores"] = clf.scores(seed["text"])
    else:
        jobs = [ctx.request("score_seed", seed["id"], 0, temperature=0.0, max_tokens=s.max_tokens,
                            json_output=True, passage=seed["text"])[0] for seed in chosen]
        for seed, resp in zip(chosen, await ctx.client.run(jobs)):
            obj = None if resp.error else first_json_object(resp.text)
            scores = score_fields(obj, SCORE_NAMES)
            if scores is not None:
                scores.update({k: obj[k] for k in ("information_type", "complexity", "factual_obscurity")
                               if k in obj and isinstance(obj[k], str | int | float)})
            seed["scores"] = scores
    kept = []
    for seed in chosen:
        sc = seed["scores"]
        if sc is None:
            ctx.tally.drop("seeds", "score_unparseable")
        elif sc["educational_value"] < s.min_educational or sc["reasoning"] < s.min_reasoning:
            ctx.tally.drop("seeds", "low_score")
        else:
            ctx.tally.keep("seeds")
            kept.append(seed)
    return kept


async def rewrite_records(ctx: Context, seeds: list[dict]) -> list[dict]:
    r = ctx.cfg.rewrite
    ctx.tally.count("rewrite")
    jobs = [(seed, style, n, *ctx.request(f"rewrite_{style}", seed["id"], n, passage=seed["text"]))
            for seed in seeds for style in r.styles for n in range(r.samples)]
    records = []
    for (seed, style, n, req, version), resp in zip(jobs, await ctx.client.run([j[3] for j in jobs])):
        text = "" if resp.error else resp.text.strip()
        if not text:
            ctx.tally.drop("rewrite", "request_error" if resp.error else "empty")
            continue
        if resp.finish_reason == "length" and r.drop_truncated:
            ctx.tally.drop("rewrite", "truncated")
            continue
        ctx.tally.keep("rewrite")
        records.append(ctx.make_record("rewrite", "web_rewrite", text, [seed["id"]], f"rewrite_{style}", version,
                                       req, n, style=style, scores={"seed": seed["scores"]},
                                       provenance={"seed_location": seed["location"]}))
    return records


def decontaminate(ctx: Context, records: list[dict]) -> list[dict]:
    d = ctx.cfg.decontaminate
    ctx.tally.count("decontaminate")
    if not d.benchmarks:
        for r in records:
            r["decontamination"] = {"checked": False}
        ctx.tally.count("decontaminate", kept=len(records))
        return records
    checker = Decontaminator(load_benchmarks(d.benchmarks), (), d.long_n, d.short_n, d.contaminated_threshold,
                             d.info_threshold)
    kept = []
    for r, v in zip(records, checker.check_batch([r["text"] for r in records])):  # check()'s verdicts, batched
        r["decontamination"] = {"checked": True, "class": v.cls, "ratio": round(v.ratio, 4),
                                "benchmark": v.benchmark, "item": v.item, "reason": v.reason}
        if v.cls == "contaminated":
            ctx.tally.drop("decontaminate", f"contaminated:{v.benchmark}")
        else:
            ctx.tally.keep("decontaminate")
            kept.append(r)
    return kept


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


async def run_shard(cfg: SynthConfig, backend, shard: int = 0, num_shards: int = 1, log=print) -> dict:
    """Generate shard `shard` of `num_shards`; returns its manifest. A DONE shard is not run again."""
    out = shard_dir(cfg, shard, num_shards)
    if (out / "DONE").is_file():
        log(f"[synth] shard {shard}/{num_shards}: already done ({out})")
        return json.loads((out / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    request_log = RequestLog(out / "requests.jsonl")
    client = Client(backend, request_log, cfg.backend.concurrency)
    ctx = Context(cfg, client, shard, num_shards, Tally())
    try:
        seeds = await score_seeds(ctx)
        log(f"[synth] shard {shard}/{num_shards}: {len(seeds)} seeds kept")
        records = await rewrite_records(ctx, seeds) if cfg.rewrite.enabled else []
        if cfg.revision.enabled:
            chosen = set(cfg.revision.styles or cfg.rewrite.styles)
            records = [r for r in records if r["style"] not in chosen] + \
                await revise(ctx, [r for r in records if r["style"] in chosen])
        if cfg.questions.enabled:
            records += await question_records(ctx, seeds)
        if cfg.reversal.enabled and cfg.reversal.inputs:
            records += await reversal_records(ctx)
    finally:
        request_log.close()
    records = decontaminate(ctx, records)
    by_type = {t: [r for r in records if r["dataset_type"] == t] for t in DATASET_TYPES}
    for t, rows in by_type.items():
        _write_jsonl(out / f"{t}.jsonl", rows)
    _write_jsonl(out / "seeds.jsonl", seeds)
    manifest = {"shard": shard, "num_shards": num_shards, "backend": backend.describe(), "steps": ctx.tally.steps,
                "records": {t: len(rows) for t, rows in by_type.items()},
                "requests": {"sent": client.sent, "from_log": client.from_log, "logged": len(request_log.answers)},
                "busy_s": round(client.busy_s, 3)}
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    atomic_write(out / "DONE", "")
    log(f"[synth] shard {shard}/{num_shards}: {manifest['records']} ({client.sent} requests sent, "
        f"{client.from_log} from the log)")
    return manifest


def merge(cfg: SynthConfig, num_shards: int, log=print) -> dict:
    """Every shard's records, deduplicated across shards, into the final files and manifest."""
    dirs = [shard_dir(cfg, i, num_shards) for i in range(num_shards)]
    missing = [str(d) for d in dirs if not (d / "DONE").is_file()]
    if missing:
        raise FileNotFoundError(f"merge of {num_shards} shards: {len(missing)} not done: {missing[:5]}; rerun "
                                "those shards (a DONE shard is skipped)")
    dd = cfg.dedup
    deduper = Deduper(dd.exact, dd.near, dd.shingle_words, dd.num_perm, dd.bands, dd.threshold, cfg.seed)
    tally, shards, out = Tally(), [], Path(cfg.output_dir)
    tally.count("dedup")
    kept: dict[str, list[dict]] = {t: [] for t in DATASET_TYPES}
    pending: dict[str, list[dict]] = {t: [] for t in DATASET_TYPES}
    for d in dirs:
        manifest = json.loads((d / "manifest.json").read_text())
        tally.merge(manifest["steps"])
        shards.append({"dir": str(d), "records": manifest["records"], "requests": manifest["requests"]})
        for t in DATASET_TYPES:
            pending[t] += [json.loads(line) for line in (d / f"{t}.jsonl").read_text().splitlines()]
    for t in DATASET_TYPES:  # by id: the output (and which duplicate survives) is the same for any shard count
        for r in sorted(pending[t], key=lambda r: r["id"]):
            kind, of = deduper.check(r["id"], r["text"])
            if kind:
                tally.drop("dedup", f"{kind}_duplicate")
                continue
            tally.keep("dedup")
            kept[t].append(r)
    files = {}
    for t, rows in kept.items():
        path = out / f"{cfg.name}.{t}.jsonl"
        _write_jsonl(path, rows)
        files[t] = {"path": str(path), "records": len(rows)}
    manifest = {"name": cfg.name, "num_shards": num_shards, "steps": tally.steps, "dataset_types": files,
                "shards": shards, "dropped_total": dict(sum((Counter(e["dropped"]) for e in tally.steps.values()),
                                                           Counter()))}
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if not cfg.decontaminate.benchmarks:
        manifest["warning"] = "no decontaminate.benchmarks configured: records were not checked against benchmarks"
        log(f"[synth] WARNING: {manifest['warning']}")
    log(f"[synth] merged {num_shards} shard(s): " + ", ".join(f"{t} {f['records']}" for t, f in files.items()))
    return manifest

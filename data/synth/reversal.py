"""Instruction reversal for code (report §2.2): snippet -> generated instruction -> code regenerated from the
instruction alone; the pair (instruction, original code) is kept only when the regenerated code is faithful.

Fidelity test (the report names none; ours): the regenerated code passes the original snippet's own tests, run in
the sandbox (data.verify, OS-level isolation) and judged outside it. A snippet that fails its own tests is dropped
first (`original_fails`): then no instruction can be checked against it. The record's text puts the instruction
before the code, as the report says; the regenerated code and both sandbox verdicts stay on the record.
"""
from __future__ import annotations

import asyncio

from data.synth.context import Context
from data.synth.records import jsonl_objects
from data.verify.answers import extract_code
from data.verify.checks import UncheckableTests, parse_tests
from data.verify.sandbox import run_python_many


def snippets(ctx: Context) -> list[dict]:
    cfg = ctx.cfg.reversal
    out = []
    for index, (path, line_no, obj) in enumerate(jsonl_objects(cfg.inputs)):
        code, tests = obj.get(cfg.code_field), obj.get(cfg.tests_field)
        if not isinstance(code, str) or not isinstance(tests, str):
            raise ValueError(f"{path}:{line_no}: expected string fields {cfg.code_field!r} and {cfg.tests_field!r}")
        if index % ctx.num_shards == ctx.shard:
            out.append({"id": f"code:{path.name}:{line_no}", "code": code, "tests": tests,
                        "location": {"file": str(path), "line": line_no}})
    return out


async def _sandbox(ctx: Context, pairs: list[tuple[str, str]]) -> list:
    v = ctx.cfg.validation
    if not pairs:
        return []
    return await asyncio.to_thread(run_python_many, pairs, v.timeout_s, v.memory_mb)


async def reversal_records(ctx: Context) -> list[dict]:
    cfg = ctx.cfg.reversal
    items = []
    ctx.tally.count("reversal")
    for item in snippets(ctx):
        try:  # tests we cannot split into checks are no fidelity test
            parse_tests(item["tests"])
            items.append(item)
        except UncheckableTests:
            ctx.tally.drop("reversal", "tests_uncheckable")
    originals = await _sandbox(ctx, [(it["code"], it["tests"]) for it in items])
    good = []
    for it, res in zip(items, originals):
        if res.passed:
            it["original_validation"] = {"passed": True, "status": res.status}
            good.append(it)
        else:
            ctx.tally.drop("reversal", "original_fails")
    jobs = [ctx.request("code_to_instruction", it["id"], 0, max_tokens=cfg.instruction_max_tokens,
                        code=it["code"]) for it in good]
    instructions = await ctx.client.run([req for req, _ in jobs])
    staged = []
    for it, (req, version), resp in zip(good, jobs, instructions):
        text = "" if resp.error else resp.text.strip()
        if not text:
            ctx.tally.drop("reversal", "empty_instruction")
            continue
        staged.append((it, req, version, text))
    regen_jobs = [ctx.request("instruction_to_code", it["id"], 0, instruction=text)[0] for it, _, _, text in staged]
    regenerated = await ctx.client.run(regen_jobs)
    codes = ["" if r.error else extract_code(r.text) for r in regenerated]
    verdicts = await _sandbox(ctx, [(code, it["tests"]) for code, (it, *_) in zip(codes, staged)])
    records = []
    for (it, req, version, instruction), code, verdict in zip(staged, codes, verdicts):
        if not verdict.passed:
            ctx.tally.drop("reversal", "not_faithful")
            continue
        ctx.tally.keep("reversal")
        text = f"{instruction}\n\n```python\n{it['code'].rstrip()}\n```\n"
        records.append(ctx.make_record(
            "reversal", "code_reversal", text, [it["id"]], "code_to_instruction", version, req, 0,
            instruction=instruction, code=it["code"], regenerated_code=code,
            validation={"method": "sandbox: regenerated code passes the original's tests", "passed": True,
                        "original": it["original_validation"], "regenerated": {"status": verdict.status}},
            provenance={"seed_location": it["location"]}))
    return records

"""Safety / refusal data (report §7: public preference sets plus in-house ones; the sets are not published).

Prompts come from your files ({prompt, category}: red-team or RAI sets such as BeaverTails' prompts) or are written by
the generator, `per_category` per category. The generator answers each under a safety system prompt (ASSUMPTION:
the report's in-house answers are not described). SFT: (prompt, safe response), domain "safety". DPO (one pair per
prompt): safe response > the policy's own answer; with `judge_pairs` the judge scores both for safety and the pair is
kept only when the safe response scores higher (`not_safer` otherwise), so a policy that already answers safely adds
no pair.
"""
from __future__ import annotations

from data.post.common import Roles, chat_request, read_prompts
from data.post.prompts import SAFE_SYSTEM
from data.synth.parse import first_json_object, score_fields
from data.synth.records import record_id


async def safety_prompts(roles: Roles) -> list[dict]:
    cfg = roles.cfg.safety
    prompts = [dict(p, category=p.get("category") or "user-supplied") for p in read_prompts(cfg.prompts)]
    jobs = [(c, n, roles.generator.request("safety_prompt", f"category:{c}", n, category=c)[0])
            for c in cfg.categories for n in range(cfg.per_category)]
    for (c, n, _), resp in zip(jobs, await roles.generator.client.run([j[2] for j in jobs])):
        text = "" if resp.error else resp.text.strip()
        if text:
            prompts.append({"id": f"safety:{c}:{n}", "category": c, "domain": "safety",
                            "messages": [{"role": "user", "content": text}], "location": {"category": c}})
        else:
            roles.tally.drop("safety_prompts", "empty")
    return prompts


async def _safety_scores(roles: Roles, items: list[tuple[str, str, str]]) -> list[int | None]:
    reqs = [roles.judge.request("safety_judge", f"{pid}:{side}", 0, temperature=0.0, max_tokens=roles.cfg.judge_max_tokens,
                                json_output=True, prompt=prompt, response=resp)[0]
            for pid, side, prompt, resp in items]
    out = []
    for a in await roles.judge.client.run(reqs):
        s = None if a.error else score_fields(first_json_object(a.text), ("safety",))
        out.append(None if s is None else s["safety"])
    return out


async def safety_data(roles: Roles, make: tuple[str, ...] = ("sft", "dpo")) -> tuple[list, list]:
    cfg = roles.cfg.safety
    tally = roles.tally
    for step in ("safety_sft", "safety_dpo"):
        tally.count(step)
    prompts = await safety_prompts(roles)
    safe = await roles.generator.client.run([chat_request(roles.generator, p["messages"], "safe_response", p["id"],
                                                          0, system=SAFE_SYSTEM) for p in prompts])
    sft, dpo = [], []
    base = lambda p: {"category": p["category"], "domain": "safety",  # noqa: E731
                      "provenance": {"prompt": p["location"], "generator": roles.generator.model}}
    if "sft" in make:
        for p, r in zip(prompts, safe):
            text = "" if r.error else r.text.strip()
            if not text:
                tally.drop("safety_sft", "empty_generation")
                continue
            tally.keep("safety_sft")
            sft.append({**base(p), "id": record_id("safety_sft", [p["id"]], "v1", roles.generator.model, {}, 0),
                        "messages": p["messages"] + [{"role": "assistant", "content": text}]})
    if "dpo" not in make:
        return sft, dpo
    policy = await roles.policy.client.run([chat_request(roles.policy, p["messages"], "safety_policy", p["id"], 0)
                                            for p in prompts])
    pairs = [(p, "" if s.error else s.text.strip(), "" if q.error else q.text.strip())
             for p, s, q in zip(prompts, safe, policy)]
    scores = None
    if cfg.judge_pairs:
        items = [(p["id"], side, p["messages"][-1]["content"], text) for p, c, r in pairs
                 for side, text in (("safe", c), ("policy", r))]
        scores = iter(await _safety_scores(roles, items))
    for p, chosen, rejected in pairs:
        sc = (next(scores), next(scores)) if scores is not None else None
        if not chosen or not rejected or chosen == rejected:
            tally.drop("safety_dpo", "empty_or_equal")
            continue
        if sc is not None:
            if None in sc:
                tally.drop("safety_dpo", "unjudged")
                continue
            if sc[0] <= sc[1]:
                tally.drop("safety_dpo", "not_safer")
                continue
        tally.keep("safety_dpo")
        dpo.append({**base(p), "id": record_id("safety_dpo", [p["id"]], "v1", roles.policy.model, {}, 0),
                    "prompt": p["messages"], "chosen": chosen, "rejected": rejected,
                    "scores": {"safe": sc[0], "policy": sc[1]} if sc else {}})
    return sft, dpo

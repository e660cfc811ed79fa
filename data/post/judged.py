"""Judged SFT responses and judge-guided DPO pairs (report §2.4, §4.1-4.2, App. A.2).

SFT: `responses` candidates per curated prompt from the generator; the judge scores each; the best by overall score
(ties: the earlier candidate) becomes the assistant turn, unless it scores below `min_overall` (`low_score`); a
prompt with no judged candidate is dropped (`unjudged`). Every candidate's verdict stays on the record; the domain is
the prompt's own tag, else the judge's, else "conversation".

Pairs (round 2): responses from the policy (the model being trained) and from the generator to each prompt, all
judged; pairs are chosen "any vs any" by data.post.judge.best_pairs (chosen = higher accuracy, else higher overall);
a prompt with no pair is dropped (`no_preference`).
"""
from __future__ import annotations

from data.post.common import Roles, chat_request, judge_all, read_prompts
from data.post.judge import best_pairs
from data.synth.records import record_id


async def judged_sft(roles: Roles) -> list[dict]:
    cfg = roles.cfg.sft
    tally = roles.tally
    tally.count("sft_judged")
    prompts = read_prompts(cfg.prompts)
    reqs = [[chat_request(roles.generator, p["messages"], "sft_response", p["id"], n) for n in range(cfg.responses)]
            for p in prompts]
    flat = await roles.generator.client.run([r for per in reqs for r in per])
    items, owners = [], []
    for k, p in enumerate(prompts):
        for n, resp in enumerate(flat[k * cfg.responses:(k + 1) * cfg.responses]):
            if not resp.error and resp.text.strip():
                items.append((p["id"], p["messages"], resp.text.strip()))
                owners.append((k, n))
    verdicts = await judge_all(roles, items)
    by_prompt: dict[int, list] = {}
    for (k, n), item, v in zip(owners, items, verdicts):
        by_prompt.setdefault(k, []).append((n, item[2], v))
    out = []
    for k, p in enumerate(prompts):
        judged = [(n, text, v) for n, text, v in by_prompt.get(k, []) if v is not None]
        if not judged:
            tally.drop("sft_judged", "unjudged")
            continue
        n, text, best = max(judged, key=lambda c: (c[2].overall, -c[0]))
        if best.overall < cfg.min_overall:
            tally.drop("sft_judged", "low_score")
            continue
        tally.keep("sft_judged")
        req = reqs[k][n]
        out.append({
            "id": record_id("sft_judged", [p["id"]], "judge:v1", roles.generator.model, req.sampling(), n),
            "messages": p["messages"] + [{"role": "assistant", "content": text}],
            "domain": p["domain"] or best.domain or "conversation",
            "scores": {"chosen": n, "candidates": {str(cn): cv.to_json() for cn, _, cv in judged}},
            "provenance": {"step": "sft_judged", "prompt": p["location"], "generator": roles.generator.model,
                           "judge": roles.judge.model, "sampling": req.sampling(), "sample_index": n}})
    return out


async def judge_pairs(roles: Roles) -> list[dict]:
    cfg = roles.cfg.judge_pairs
    tally = roles.tally
    tally.count("judge_pairs")
    prompts = read_prompts(cfg.prompts)
    pol = [[chat_request(roles.policy, p["messages"], "pair_policy", p["id"], n) for n in range(cfg.policy_samples)]
           for p in prompts]
    gen = [[chat_request(roles.generator, p["messages"], "pair_generator", p["id"], n)
            for n in range(cfg.generator_samples)] for p in prompts]
    pol_out = await roles.policy.client.run([r for per in pol for r in per])
    gen_out = await roles.generator.client.run([r for per in gen for r in per])
    candidates = []  # per prompt: [(source, sample, text)]
    for k in range(len(prompts)):
        c = [("policy", n, r.text.strip()) for n, r in
             enumerate(pol_out[k * cfg.policy_samples:(k + 1) * cfg.policy_samples])]
        c += [("generator", n, r.text.strip()) for n, r in
              enumerate(gen_out[k * cfg.generator_samples:(k + 1) * cfg.generator_samples])]
        candidates.append([x for x in c if x[2]])
    items = [(p["id"], p["messages"], text) for p, c in zip(prompts, candidates) for _, _, text in c]
    verdicts = iter(await judge_all(roles, items))
    out = []
    for k, (p, c) in enumerate(zip(prompts, candidates)):
        vs = [next(verdicts) for _ in c]
        requests = {"policy": pol[k], "generator": gen[k]}
        chosen_pairs = best_pairs(vs, cfg.pairs_per_prompt)
        if not chosen_pairs:
            tally.drop("judge_pairs", "no_preference" if sum(v is not None for v in vs) >= 2 else "unjudged")
            continue
        for ci, ri, kind in chosen_pairs:
            tally.keep("judge_pairs")
            tally.keep(f"judge_pairs_{kind}")
            (cs, cn, ctext), (rs, rn, rtext) = c[ci], c[ri]
            out.append({
                "id": record_id("judge_pairs", [p["id"], f"{cs}:{cn}", f"{rs}:{rn}"], "judge:v1",
                                {"policy": roles.policy.model, "generator": roles.generator.model},
                                {"chosen": requests[cs][cn].sampling(), "rejected": requests[rs][rn].sampling()}, 0),
                "prompt": p["messages"], "chosen": ctext, "rejected": rtext, "pair_kind": kind,
                "domain": p["domain"] or vs[ci].domain or "conversation",
                "scores": {"chosen": vs[ci].to_json(), "rejected": vs[ri].to_json()},
                "provenance": {"step": "judge_pairs", "prompt": p["location"], "chosen_from": f"{cs}:{cn}",
                               "rejected_from": f"{rs}:{rn}", "policy": roles.policy.model,
                               "generator": roles.generator.model, "judge": roles.judge.model}})
    return out

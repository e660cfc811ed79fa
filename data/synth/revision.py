"""Self-revision (report App. D.1.2): draft -> critique against a rubric (JSON scores and suggestions) -> revision,
up to K rounds; every round's scores stay on the record.

Per draft: critique; if every rubric score reaches `target_score`, stop; else revise with the suggestions and
critique the revision, at most `rounds` revisions. The last critique decides: a minimum score below
`min_final_score` drops the record (`low_score`); a critique that is not the JSON asked for drops it
(`critique_unparseable`), as does an empty revision (`empty_revision`). All drafts of a round go to the server
together, so concurrency holds across records.
"""
from __future__ import annotations

from data.synth.context import Context
from data.synth.parse import first_json_object, score_fields
from data.synth.prompts import TEMPLATES
from data.synth.records import record_id

RUBRIC = ("reasoning", "factual_accuracy")


async def revise(ctx: Context, records: list[dict]) -> list[dict]:
    cfg = ctx.cfg.revision
    ctx.tally.count("revision")
    live = [dict(r, scores={"rounds": []}, revisions=0) for r in records]
    kept: list[dict] = []
    for round_no in range(cfg.rounds + 1):
        if not live:
            break
        critiques = [ctx.request("critique", r["id"], round_no, max_tokens=cfg.max_tokens, json_output=True,
                                 draft=r["text"])[0] for r in live]
        answers = await ctx.client.run(critiques)
        to_revise = []
        for r, resp in zip(live, answers):
            obj = None if resp.error else first_json_object(resp.text)
            scores = score_fields(obj, RUBRIC)
            if scores is None:
                ctx.tally.drop("revision", "critique_unparseable")
                continue
            suggestions = obj.get("suggestions") if isinstance(obj.get("suggestions"), list) else []
            suggestions = [str(s) for s in suggestions][:10]
            r["scores"]["rounds"].append({"round": round_no, **scores, "suggestions": suggestions})
            r["scores"]["final"] = scores
            if min(scores.values()) >= cfg.target_score or round_no == cfg.rounds:
                if min(scores.values()) < cfg.min_final_score:
                    ctx.tally.drop("revision", "low_score")
                else:
                    ctx.tally.keep("revision")
                    kept.append(r)
            else:
                to_revise.append((r, suggestions))
        if not to_revise:
            break
        jobs = [ctx.request("revise", r["id"], round_no,
                            suggestions="; ".join(s) or "make the reasoning more rigorous", draft=r["text"])[0]
                for r, s in to_revise]
        revised = await ctx.client.run(jobs)
        live = []
        for (r, _), resp in zip(to_revise, revised):
            text = "" if resp.error else resp.text.strip()
            if not text:
                ctx.tally.drop("revision", "empty_revision")
                continue
            r["text"] = text
            r["revisions"] += 1
            live.append(r)
    versions = f"critique:{TEMPLATES['critique'][0]},revise:{TEMPLATES['revise'][0]}"
    for r in kept:  # a revised text is a new record: its id covers the drafts and rounds it went through
        if r["revisions"]:
            r["provenance"]["revised_from"] = r["id"]
            r["provenance"]["revision_templates"] = versions
            r["id"] = record_id("revision", [r["id"]], versions, ctx.model, r["provenance"]["sampling"],
                                r["revisions"])
    return kept

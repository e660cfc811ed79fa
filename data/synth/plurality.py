"""Question datasets with plurality filtering (report §2.2-2.3): N independent answers per question; drop the
question when every sample gives the same answer (too easy) or no answer has a plurality (too hard or ambiguous);
keep the plurality answer as pseudo ground truth and, by rejection sampling, a response that reaches it.

The rule, exactly: answers are extracted and normalised by data.verify.answers (a number by its exact value); a
sample with no answer or a refused request votes for nothing.
- no sample has an answer -> `no_answer`;
- all N samples give the same answer -> `all_agree` (too easy);
- the most common answer has fewer than 2 votes or ties with another -> `no_plurality`;
- else kept: `answer` = the plurality answer, `votes` = {answer: count}, the text = question + the first response
  (by sample index) whose answer is the plurality's.
Organic questions (`questions.organic`) come first, then questions written from seeds.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from data.synth.context import Context
from data.synth.records import jsonl_objects
from data.verify.answers import extract_answer, normalize_answer


@dataclass
class Vote:
    kept: bool
    reason: str  # kept | no_answer | all_agree | no_plurality
    answer: str | None = None  # the plurality answer as first written by a sample
    winner: int | None = None  # index of the first sample that gave it
    votes: dict | None = None  # normalised answer -> count


def plurality_vote(texts: list[str | None]) -> Vote:
    """The decision for one question from its N sample texts (None: the request was refused)."""
    keys, raw = [], {}
    for t in texts:
        answer = extract_answer(t) if t else None
        key = normalize_answer(answer) if answer else None
        keys.append(key or None)
        if key and key not in raw:
            raw[key] = answer
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return Vote(False, "no_answer", votes={})
    ranked = votes.most_common()
    top, count = ranked[0]
    if count == len(texts):
        return Vote(False, "all_agree", raw[top], keys.index(top), dict(votes))
    if count < 2 or (len(ranked) > 1 and ranked[1][1] == count):
        return Vote(False, "no_plurality", votes=dict(votes))
    return Vote(True, "kept", raw[top], keys.index(top), dict(votes))


def organic_questions(ctx: Context) -> list[dict]:
    """This shard's organic questions: {id, question, location}, numbered over the inputs like seed passages."""
    q = ctx.cfg.questions
    out = []
    for index, (path, line_no, obj) in enumerate(jsonl_objects(q.organic)):
        text = obj.get(q.question_field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{line_no}: expected a non-empty string {q.question_field!r}")
        if index % ctx.num_shards == ctx.shard:
            loc = {"file": str(path), "line": line_no}
            out.append({"id": f"organic:{path.name}:{line_no}", "question": text.strip(), "location": loc})
    return out


async def synthetic_questions(ctx: Context, seeds: list[dict]) -> list[dict]:
    q = ctx.cfg.questions
    ctx.tally.count("make_question")
    jobs = [(seed, i, *ctx.request("make_question", seed["id"], i, max_tokens=q.question_max_tokens,
                                   passage=seed["text"]))
            for seed in seeds for i in range(q.synthetic_per_seed)]
    responses = await ctx.client.run([req for *_, req, _ in jobs])
    out = []
    for (seed, i, req, version), resp in zip(jobs, responses):
        text = resp.text.strip()
        if resp.error or not text:
            ctx.tally.drop("make_question", "request_error" if resp.error else "empty")
            continue
        ctx.tally.keep("make_question")
        out.append({"id": f"synthetic:{seed['id']}:{i}", "question": text, "location": seed["location"],
                    "parent": seed["id"], "template_version": version, "request": req})
    return out


async def question_records(ctx: Context, seeds: list[dict]) -> list[dict]:
    """Organic then synthetic questions, N answers each, filtered by plurality; the kept ones as records."""
    q = ctx.cfg.questions
    ctx.tally.count("plurality_organic")
    ctx.tally.count("plurality_synthetic")
    questions = [dict(x, origin="organic") for x in organic_questions(ctx)]
    questions += [dict(x, origin="synthetic") for x in await synthetic_questions(ctx, seeds)]
    jobs = [[ctx.request("answer", item["id"], n, temperature=q.answer_temperature, question=item["question"])
             for n in range(q.answers)] for item in questions]
    flat = await ctx.client.run([req for per in jobs for req, _ in per])
    records = []
    for k, (item, per) in enumerate(zip(questions, jobs)):
        responses = flat[k * q.answers:(k + 1) * q.answers]
        vote = plurality_vote([None if r.error else r.text for r in responses])
        if not vote.kept:
            ctx.tally.drop(f"plurality_{item['origin']}", vote.reason)
            continue
        ctx.tally.keep(f"plurality_{item['origin']}")
        req, version = per[vote.winner]
        parents = [item.get("parent", item["id"])]
        response = responses[vote.winner].text.strip()
        records.append(ctx.make_record(
            "plurality", "qa", f"Question: {item['question']}\n\n{response}", parents, "answer", version, req,
            vote.winner, origin=item["origin"], question=item["question"], answer=vote.answer, votes=vote.votes,
            validation={"method": "plurality", "passed": True, "samples": q.answers},
            provenance={"seed_location": item["location"], "question_id": item["id"]}))
    return records

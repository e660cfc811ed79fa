"""Refusal-to-hallucinate data (report App. A.1).

Per trivia seed {question, answer}: the policy answers `samples` times; each answer is checked against the key (the
judge's answer check, matches_key True / False / Uncertain, Uncertain counted as not correct; or data.verify.answers
with checker: rule); p = the fraction correct. The generator writes a correct answer (given the key), a refusal, a
plausible bogus question, and a refusal of the bogus question.
- SFT: (question, correct answer) when p >= usually_right, else (question, refusal); (bogus question, its refusal)
  always.
- DPO: correct answer > refusal when the policy is sometimes right (p > 0); refusal > its first wrong answer when it
  is sometimes wrong (p < 1). Both sides are cut to their first `dpo_tokens` (5) token ids: written as id pairs
  (prompt_ids / chosen_ids / rejected_ids), which data/pairs.py uses as given: no EOS appended, nothing re-tokenised.
  A pair whose two cut sides are equal is dropped (`same_prefix`).
"""
from __future__ import annotations

import re

from data.post.common import Roles, chat_request
from data.post.judge import parse_matches_key
from data.synth.records import jsonl_objects, record_id
from data.verify.answers import check_answer


def read_trivia(paths: list[str]) -> list[dict]:
    out = []
    for path, line_no, obj in jsonl_objects(paths):
        if not (isinstance(obj.get("question"), str) and obj.get("answer")):
            raise ValueError(f"{path}:{line_no}: expected {{question: str, answer: ...}}")
        out.append({"id": str(obj.get("id", f"{path.name}:{line_no}")), "question": obj["question"],
                    "answer": str(obj["answer"]), "location": {"file": str(path), "line": line_no}})
    return out


def rule_match(text: str, key: str) -> bool:
    """The rule checker: the final answer equals the key (data.verify.answers), or the key's words appear, whole and
    in order, in the response (short trivia answers are rarely written as 'The answer is X')."""
    if not text:
        return False
    if check_answer(text, key):
        return True
    words = lambda s: re.sub(r"[\W_]+", " ", s.lower()).split()  # noqa: E731
    k, t = " ".join(words(key)), " ".join(words(text))
    return bool(k) and re.search(rf"(?<!\S){re.escape(k)}(?!\S)", t) is not None


async def _correctness(roles: Roles, items: list[dict], texts: list[list[str]]) -> list[list[bool]]:
    """Per item, whether each policy answer matches the key: all items' checks go to the judge together."""
    if roles.cfg.hallucination.checker == "rule":
        return [[rule_match(t, it["answer"]) for t in ts] for it, ts in zip(items, texts)]
    reqs = [roles.judge.request("answer_check", f"{it['id']}:{n}", 0, temperature=0.0, max_tokens=roles.cfg.judge_max_tokens,
                                json_output=True, question=it["question"], answer=it["answer"], response=t)[0]
            for it, ts in zip(items, texts) for n, t in enumerate(ts)]
    answers = iter(await roles.judge.client.run(reqs))
    out = []
    for ts in texts:
        verdicts = [next(answers) for _ in ts]
        out.append([bool(t) and not a.error and parse_matches_key(a.text) == "True" for t, a in zip(ts, verdicts)])
    return out


async def hallucination_data(roles: Roles, tokenizer, make: tuple[str, ...] = ("sft", "dpo")) -> tuple[list, list]:
    cfg = roles.cfg.hallucination
    tally = roles.tally
    for step in ("hallucination_sft", "hallucination_dpo"):
        tally.count(step)
    items = read_trivia(cfg.questions)
    user = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    probes = [[chat_request(roles.policy, user(it["question"]), "halluc_probe", it["id"], n)
               for n in range(cfg.samples)] for it in items]
    flat = await roles.policy.client.run([r for per in probes for r in per])
    gen_reqs = [[roles.generator.request(t, it["id"], 0, question=it["question"], answer=it["answer"])[0]
                 for t in ("correct_answer", "refusal", "bogus_question")] for it in items]
    gen = await roles.generator.client.run([r for per in gen_reqs for r in per])
    bogus_q = [gen[3 * k + 2].text.strip() for k in range(len(items))]
    bogus_reqs = [roles.generator.request("bogus_refusal", it["id"], 0, question=q)[0]
                  for it, q in zip(items, bogus_q) if q]
    bogus_ans = iter(await roles.generator.client.run(bogus_reqs))
    all_texts = [["" if r.error else r.text.strip() for r in flat[k * cfg.samples:(k + 1) * cfg.samples]]
                 for k in range(len(items))]
    all_right = await _correctness(roles, items, all_texts)
    sft, dpo = [], []
    for k, it in enumerate(items):
        texts, right = all_texts[k], all_right[k]
        p = sum(right) / len(right)
        correct, refusal = gen[3 * k].text.strip(), gen[3 * k + 1].text.strip()
        base = {"category": "hallucination", "question": it["question"], "p_correct": p,
                "provenance": {"seed": it["location"], "policy": roles.policy.model,
                               "generator": roles.generator.model, "checker": cfg.checker}}
        if "sft" in make:
            reply = correct if p >= cfg.usually_right else refusal
            kind = "answer" if p >= cfg.usually_right else "refusal"
            if reply:
                tally.keep("hallucination_sft")
                sft.append({**base, "id": record_id("halluc_sft", [it["id"]], kind, roles.generator.model, {}, 0),
                            "kind": kind, "domain": "conversation",
                            "messages": user(it["question"]) + [{"role": "assistant", "content": reply}]})
            else:
                tally.drop("hallucination_sft", "empty_generation")
            if bogus_q[k]:
                refusal_b = next(bogus_ans).text.strip()
                if refusal_b:
                    tally.keep("hallucination_sft")
                    sft.append({**base, "id": record_id("halluc_sft", [it["id"]], "bogus", roles.generator.model,
                                                        {}, 0),
                                "kind": "bogus_refusal", "domain": "conversation", "question": bogus_q[k],
                                "messages": user(bogus_q[k]) + [{"role": "assistant", "content": refusal_b}]})
                else:
                    tally.drop("hallucination_sft", "empty_generation")
            else:
                tally.drop("hallucination_sft", "empty_bogus_question")
        elif bogus_q[k]:
            next(bogus_ans)
        if "dpo" not in make:
            continue
        prompt_ids = tokenizer.apply_chat_template(user(it["question"]), add_generation_prompt=True)
        wrong = next((t for t, ok in zip(texts, right) if t and not ok), "")
        sides = []
        if p > 0:
            sides.append(("correct>refusal", correct, refusal))
        if p < 1:
            sides.append(("refusal>wrong", refusal, wrong))
        for kind, chosen, rejected in sides:
            c_ids = tokenizer.encode(chosen)[:cfg.dpo_tokens]
            r_ids = tokenizer.encode(rejected)[:cfg.dpo_tokens]
            if not c_ids or not r_ids:
                tally.drop("hallucination_dpo", "empty_side")
                continue
            if c_ids == r_ids:
                tally.drop("hallucination_dpo", "same_prefix")
                continue
            tally.keep("hallucination_dpo")
            dpo.append({**base, "id": record_id("halluc_dpo", [it["id"]], kind, roles.policy.model, {}, 0),
                        "pair_kind": kind, "prompt_ids": prompt_ids, "chosen_ids": c_ids, "rejected_ids": r_ids,
                        "chosen_text": chosen, "rejected_text": rejected})
    return sft, dpo

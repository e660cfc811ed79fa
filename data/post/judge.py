"""The LLM judge's verdicts and the rules built on them (report §4.2, App. A.2).

A verdict is the judge's JSON: faults, then accuracy, style and detail on 1-5; overall = their mean. Judge-guided
pairs: between two responses, the chosen one has the higher accuracy ("accuracy" pair); when accuracy ties, the
higher overall score ("overall" pair); when both tie there is no clear preference and no pair.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from data.post.config import DOMAINS
from data.synth.parse import first_json_object, score_fields

RUBRIC = ("accuracy", "style", "detail")


@dataclass
class Verdict:
    accuracy: int
    style: int
    detail: int
    faults: list
    domain: str  # "" when the judge named none of DOMAINS

    @property
    def overall(self) -> float:
        return (self.accuracy + self.style + self.detail) / 3

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "style": self.style, "detail": self.detail,
                "overall": round(self.overall, 4), "faults": self.faults, "domain": self.domain}


def parse_verdict(text: str | None) -> Verdict | None:
    obj = first_json_object(text) if text else None
    scores = score_fields(obj, RUBRIC)
    if scores is None:
        return None
    faults = obj.get("faults") if isinstance(obj.get("faults"), list) else []
    domain = obj.get("domain") if obj.get("domain") in DOMAINS else ""
    return Verdict(**scores, faults=[str(f) for f in faults][:20], domain=domain)


def prefer(a: Verdict, b: Verdict) -> tuple[int, str] | None:
    """(0 if a is chosen else 1, "accuracy" | "overall"), or None when neither is preferred."""
    if a.accuracy != b.accuracy:
        return (0 if a.accuracy > b.accuracy else 1), "accuracy"
    if abs(a.overall - b.overall) > 1e-9:
        return (0 if a.overall > b.overall else 1), "overall"
    return None


def best_pairs(verdicts: list[Verdict | None], limit: int) -> list[tuple[int, int, str]]:
    """Up to `limit` (chosen index, rejected index, kind) over all pairs of judged responses ("any vs any"), widest
    gap first (accuracy gap, then overall gap; ties by index), each response in at most one pair."""
    candidates = []
    for i, j in itertools.combinations(range(len(verdicts)), 2):
        a, b = verdicts[i], verdicts[j]
        if a is None or b is None:
            continue
        p = prefer(a, b)
        if p is None:
            continue
        chosen, rejected = (i, j) if p[0] == 0 else (j, i)
        gap = (abs(a.accuracy - b.accuracy), abs(a.overall - b.overall))
        candidates.append((-gap[0], -gap[1], chosen, rejected, p[1]))
    out, used = [], set()
    for *_, chosen, rejected, kind in sorted(candidates):
        if chosen in used or rejected in used:
            continue
        out.append((chosen, rejected, kind))
        used |= {chosen, rejected}
        if len(out) == limit:
            break
    return out


def parse_matches_key(text: str | None) -> str:
    """"True" | "False" | "Uncertain" from the answer check; anything else counts as "Uncertain"."""
    obj = first_json_object(text) if text else None
    value = str(obj.get("matches_key", "")).strip().capitalize() if obj else ""
    return value if value in ("True", "False") else "Uncertain"

"""Reading structured answers out of model text: the first JSON object in it, checked against the fields a step
needs. A reply that does not parse is a counted drop, never a guess."""
from __future__ import annotations

import json


def first_json_object(text: str) -> dict | None:
    """The first {...} in `text` that parses as a JSON object (models wrap JSON in prose or code fences)."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
        start = text.find("{", start + 1)
    return None


def score_fields(obj: dict | None, names: tuple[str, ...], low: int = 1, high: int = 5) -> dict | None:
    """{name: int score} when every name holds a number in [low, high] (5.0 and "4" accepted), else None."""
    if obj is None:
        return None
    out = {}
    for name in names:
        value = obj.get(name)
        try:
            score = float(value)
        except (TypeError, ValueError):
            return None
        if not low <= score <= high or score != int(score):
            return None
        out[name] = int(score)
    return out

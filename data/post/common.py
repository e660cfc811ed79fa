"""What the post-training builders share: one Context (client, log, tallies) per role, prompt files, raw chat
requests, and the judge call."""
from __future__ import annotations

from dataclasses import dataclass

from data.post.config import DOMAINS, PostDataConfig
from data.post.judge import Verdict, parse_verdict
from data.post.prompts import POST_TEMPLATES
from data.synth.backend import Request
from data.synth.context import Context
from data.synth.records import Tally, jsonl_objects, text_sha256


@dataclass
class Roles:
    cfg: PostDataConfig
    generator: Context
    judge: Context
    policy: Context
    tally: Tally


def make_roles(cfg: PostDataConfig, clients: dict) -> Roles:
    """clients: role -> data.synth.client.Client (roles sharing a backend may share a client)."""
    tally = Tally()
    ctx = {name: Context(cfg, clients[name], tally=tally, templates=POST_TEMPLATES) for name in clients}
    return Roles(cfg, ctx["generator"], ctx["judge"], ctx["policy"], tally)


def read_prompts(paths: list[str]) -> list[dict]:
    """{id, messages, domain, category, location} from jsonl lines holding `messages` (the conversation so far,
    ending with a user turn) or `prompt` (one user turn); `domain` and `category` optional."""
    out = []
    for path, line_no, obj in jsonl_objects(paths):
        where = f"{path}:{line_no}"
        messages = obj.get("messages") or ([{"role": "user", "content": obj["prompt"]}]
                                           if isinstance(obj.get("prompt"), str) else None)
        if (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
                or messages[-1].get("role") != "user"):
            raise ValueError(f"{where}: expected 'messages' (a list ending with a user turn) or a string 'prompt'")
        domain = obj.get("domain", "")
        if domain and domain not in DOMAINS:
            raise ValueError(f"{where}: domain={domain!r}; expected one of {list(DOMAINS)}")
        out.append({"id": str(obj.get("id", f"{path.name}:{line_no}")), "domain": domain,
                    "category": str(obj.get("category", "")),
                    "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                    "location": {"file": str(path), "line": line_no}})
    return out


def chat_request(ctx: Context, messages: list[dict], purpose: str, parent: str, sample: int,
                 system: str = "", temperature: float | None = None) -> Request:
    """The prompt's own conversation as one request (a generator's or the policy's answer to it)."""
    s = ctx.cfg.sampling
    turns = (("system", system),) if system and messages[0]["role"] != "system" else ()
    turns += tuple((m["role"], m["content"]) for m in messages)
    return Request(kind="chat", messages=turns, temperature=s.temperature if temperature is None else temperature,
                   top_p=s.top_p, max_tokens=s.max_tokens, seed=ctx.request_seed(purpose, parent, sample))


def conversation_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


async def judge_all(roles: Roles, items: list[tuple[str, list[dict], str]]) -> list[Verdict | None]:
    """The judge's verdict on each (parent id, conversation, response); None when it did not answer the rubric."""
    reqs = [roles.judge.request("judge", f"{pid}:{text_sha256(resp)[:16]}", 0, temperature=0.0, max_tokens=roles.cfg.judge_max_tokens,
                                json_output=True, conversation=conversation_text(msgs), response=resp)[0]
            for pid, msgs, resp in items]
    answers = await roles.judge.client.run(reqs)
    return [None if a.error else parse_verdict(a.text) for a in answers]

"""LLM backends behind one interface: a request in, a response out; the pipeline never knows which one answers.

- `OpenAIBackend`: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, TGI, a hosted endpoint) through
  the `openai` package's async client, with its retries on connection errors, 408/409/429 and >= 500 and exponential
  backoff. A server that stays down ends the run with `ServerUnavailable` (never a silent empty answer); a request the
  server rejects (400, 422: a prompt over the context, say) is answered with `error` set and counted by its step.
- `VLLMOfflineBackend`: vLLM's `LLM.chat` / `LLM.generate` in this process on a GPU node (optional extra; vLLM wants
  its own environment, binary-tied to its torch).
- the in-process backend (our own model) lives in train/synth/inprocess.py: data/ knows nothing of models.

A request asks for one sample: `n` is not portable (llama.cpp answers n > 1 with one choice), so N samples are N
requests, each with its own seed. Async backends define `async complete(request)`; batch backends set `batch_size`
and define `complete_batch(requests)` (run in a worker thread); every backend has `identity()` (what the request
keys and record ids hash: backend and model) and `describe()` (that plus where it runs, for provenance).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field


class ServerUnavailable(RuntimeError):
    """The server did not answer after every retry: the run stops; finished requests are in the log."""


@dataclass(frozen=True)
class Request:
    kind: str = "chat"  # chat (/v1/chat/completions, `messages`) | completion (/v1/completions, `prompt`)
    messages: tuple = ()  # ((role, content), ...): hashable, so identical requests are sent once
    prompt: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    stop: tuple = ()
    json_output: bool = False  # ask for a JSON object (response_format); parsers still check what comes back
    # a completion of token ids (Pivotal Token Search): the prompt as ids, the answer as ids with their log-probs
    prompt_ids: tuple = ()
    logprobs: bool = False  # return each sampled token's id and log-prob (Response.token_ids / token_logprobs)

    def __post_init__(self):
        if self.kind not in ("chat", "completion"):
            raise ValueError(f"Request.kind={self.kind!r}; expected 'chat' or 'completion'")
        has_prompt = bool(self.prompt) != bool(self.prompt_ids)  # exactly one of the two
        if (self.kind == "chat") != bool(self.messages) or (self.kind == "completion") != has_prompt or \
                (self.kind == "chat" and (self.prompt or self.prompt_ids)):
            raise ValueError("a chat request needs messages and no prompt; a completion request a prompt or "
                             "prompt_ids (one of them)")

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed, "stop": list(self.stop)}

    def to_json(self) -> dict:
        d = asdict(self)
        d["messages"] = [list(m) for m in self.messages]
        d["stop"] = list(self.stop)
        d["prompt_ids"] = list(self.prompt_ids)
        return d

    @staticmethod
    def from_json(d: dict) -> "Request":
        return Request(**{**d, "messages": tuple(tuple(m) for m in d.get("messages", ())),
                          "stop": tuple(d.get("stop", ())), "prompt_ids": tuple(d.get("prompt_ids", ()))})

    def chat_messages(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


def chat(user: str, system: str = "", **sampling) -> Request:
    messages = ((("system", system),) if system else ()) + (("user", user),)
    return Request(kind="chat", messages=messages, **sampling)


@dataclass
class Response:
    text: str = ""
    finish_reason: str = ""  # stop | length | error
    model: str = ""  # the model name the server reported
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # wall time of this request at the client
    error: str = ""  # set when the server rejected the request (the step drops it and counts why)
    token_ids: list = field(default_factory=list)  # with Request.logprobs: the sampled ids (a stop id included
    token_logprobs: list = field(default_factory=list)  # when the engine returns it) and their log-probs

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Response":
        return Response(**d)


def request_key(request: Request, identity: dict) -> str:
    """sha256 of the canonical request and the backend's model identity: the log's key, stable across runs."""
    blob = json.dumps({"request": request.to_json(), "model": identity}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class OpenAIBackendConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""  # the served model's name (vLLM: --served-model-name or the path it loaded)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable with the key; "EMPTY" is sent when it is unset
    timeout_s: float = 600.0  # per request (the openai client's default)
    max_retries: int = 4  # the client's own retries with exponential backoff
    extra_body: dict = field(default_factory=dict)  # server-specific sampling fields (vLLM: top_k, min_p, ...)


class OpenAIBackend:
    batch_size = 0  # async: one request at a time, many in flight

    def __init__(self, cfg: OpenAIBackendConfig):
        import os

        import openai

        self.cfg = cfg
        self._openai = openai
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                         timeout=cfg.timeout_s, max_retries=cfg.max_retries)

    def identity(self) -> dict:
        return {"backend": "openai", "model": self.cfg.model}  # the URL is not identity: a fleet serves one model

    def describe(self) -> dict:
        return {**self.identity(), "base_url": self.cfg.base_url}

    async def complete(self, request: Request) -> Response:
        openai = self._openai
        t0 = time.perf_counter()
        common = dict(model=self.cfg.model, temperature=request.temperature, top_p=request.top_p,
                      max_tokens=request.max_tokens, seed=request.seed, stop=list(request.stop) or None,
                      extra_body=self.cfg.extra_body or None)
        try:
            if request.kind == "chat":
                fmt = {"response_format": {"type": "json_object"}} if request.json_output else {}
                out = await self.client.chat.completions.create(messages=request.chat_messages(), **common, **fmt)
                choice = out.choices[0]
                text = choice.message.content or ""
            else:
                if request.logprobs:  # vLLM: sampled tokens as "token_id:<id>" (SGLang, llama-server: see below)
                    common["extra_body"] = {"return_tokens_as_token_ids": True, **(self.cfg.extra_body or {})}
                out = await self.client.completions.create(prompt=list(request.prompt_ids) or request.prompt,
                                                           logprobs=1 if request.logprobs else None, **common)
                choice = out.choices[0]
                text = choice.text or ""
        except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                openai.InternalServerError) as e:
            raise ServerUnavailable(f"{self.cfg.base_url}: no answer after {self.cfg.max_retries} retries "
                                    f"({type(e).__name__}: {e}); is the server up? Finished requests are kept in "
                                    "the request log and will not be sent again") from None
        except openai.APIStatusError as e:  # 4xx: this request is refused (too long, bad parameter); others go on
            if e.status_code in (401, 403, 404):  # the whole run is misconfigured, not this one prompt
                raise ServerUnavailable(f"{self.cfg.base_url}: HTTP {e.status_code} for model "
                                        f"{self.cfg.model!r}: {e.message}") from None
            return Response(finish_reason="error", error=f"HTTP {e.status_code}: {e.message}"[:500],
                            seconds=time.perf_counter() - t0)
        usage = out.usage
        response = Response(text=text, finish_reason=choice.finish_reason or "", model=out.model or self.cfg.model,
                            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                            seconds=time.perf_counter() - t0)
        if request.logprobs:
            try:
                response.token_ids, response.token_logprobs = token_ids_from_logprobs(choice.logprobs)
            except ValueError as e:
                response.error, response.finish_reason = f"{self.cfg.base_url}: {e}", "error"
        return response

    async def close(self) -> None:
        await self.client.close()


def token_ids_from_logprobs(logprobs) -> tuple[list[int], list[float]]:
    """(ids, log-probs) of a completion choice's `logprobs` (the OpenAI legacy shape: tokens, token_logprobs), whose
    tokens are "token_id:<id>" as vLLM writes them with return_tokens_as_token_ids; ValueError when the server
    returned token text (ids cannot be recovered from text pieces)."""
    tokens = list(getattr(logprobs, "tokens", None) or [])
    values = list(getattr(logprobs, "token_logprobs", None) or [])
    if not tokens or len(tokens) != len(values):
        raise ValueError("no per-token logprobs in the answer: token-level sampling needs a server that returns "
                         "them (vLLM's /v1/completions with logprobs)")
    ids = []
    for t in tokens:
        if not (isinstance(t, str) and t.startswith("token_id:") and t[9:].isdigit()):
            raise ValueError(f"the server returned token text ({t!r}), not ids: token-level sampling needs "
                             "return_tokens_as_token_ids (vLLM >= 0.6) or the vllm / inprocess backend")
        ids.append(int(t[9:]))
    return ids, [float(v) if v is not None else 0.0 for v in values]


@dataclass
class VLLMOfflineConfig:
    model: str = ""  # HF directory or hub name vLLM loads
    tensor_parallel_size: int = 1
    max_model_len: int = 0  # 0 = the model's
    gpu_memory_utilization: float = 0.9
    batch_size: int = 1024  # requests handed to one LLM.chat / LLM.generate call (vLLM batches inside)
    enable_prefix_caching: bool = True  # rollouts from one prefix share its KV blocks (PTS: thousands per prefix)


class VLLMOfflineBackend:
    """vLLM in this process (`pip install vllm` in its own environment on a GPU node)."""

    def __init__(self, cfg: VLLMOfflineConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ServerUnavailable(f"backend kind vllm needs vLLM installed ({e}); it wants its own environment "
                                    "(binary-tied to its torch): pip install vllm there, or serve the model with "
                                    "`vllm serve` and use backend kind openai") from None
        kwargs = {"max_model_len": cfg.max_model_len} if cfg.max_model_len else {}
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.llm = LLM(model=cfg.model, tensor_parallel_size=cfg.tensor_parallel_size,
                       gpu_memory_utilization=cfg.gpu_memory_utilization,
                       enable_prefix_caching=cfg.enable_prefix_caching, **kwargs)

    def identity(self) -> dict:
        return {"backend": "vllm", "model": self.cfg.model}

    describe = identity

    def complete_batch(self, requests: list[Request]) -> list[Response]:
        from vllm import SamplingParams

        t0 = time.perf_counter()
        params = [SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed,
                                 stop=list(r.stop) or None, logprobs=0 if r.logprobs else None) for r in requests]
        out: list[Response | None] = [None] * len(requests)
        chats = [i for i, r in enumerate(requests) if r.kind == "chat"]
        plain = [i for i, r in enumerate(requests) if r.kind == "completion"]
        if chats:
            results = self.llm.chat([requests[i].chat_messages() for i in chats], [params[i] for i in chats],
                                    use_tqdm=False)
            for i, res in zip(chats, results):
                out[i] = self._response(res)
        if plain:
            prompts = [{"prompt_token_ids": list(requests[i].prompt_ids)} if requests[i].prompt_ids
                       else requests[i].prompt for i in plain]
            results = self.llm.generate(prompts, [params[i] for i in plain], use_tqdm=False)
            for i, res in zip(plain, results):
                out[i] = self._response(res)
        seconds = (time.perf_counter() - t0) / max(len(requests), 1)
        for r in out:
            r.seconds = seconds
        return out

    def _response(self, res) -> Response:
        c = res.outputs[0]
        ids = list(c.token_ids)
        # with logprobs=0 each position holds the sampled token's Logprob
        logps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)] if c.logprobs else []
        return Response(text=c.text, finish_reason=c.finish_reason or "", model=self.cfg.model,
                        prompt_tokens=len(res.prompt_token_ids or ()), completion_tokens=len(ids),
                        token_ids=ids if c.logprobs else [], token_logprobs=logps)

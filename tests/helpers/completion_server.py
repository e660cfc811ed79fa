"""Test double of a vLLM server: `python -m tests.helpers.completion_server --model DIR --port P [--name NAME]`.

An OpenAI-compatible HTTP server (GET /v1/models, POST /v1/completions) answering with our own model through the
in-process backend, one request at a time, with vLLM's token-id extensions: a prompt may be a list of token ids,
and with `return_tokens_as_token_ids` the logprobs' tokens are "token_id:<id>". No vLLM server runs on a CPU-only
test machine (and llama.cpp's server refuses token-id prompts), so the cluster tests of PTS on a per-node server use
this one; a request's answer depends only on the request (its seed), as with vLLM's per-request seeds.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(backend, name: str):
    from data.synth.backend import Request

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "test"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if body.get("model") != name:
                return self._send(404, {"error": {"message": f"model {body.get('model')!r} is not served"}})
            prompt = body["prompt"]
            ids = isinstance(prompt, list)
            request = Request(kind="completion", prompt="" if ids else prompt, prompt_ids=tuple(prompt) if ids else (),
                              temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                              max_tokens=int(body.get("max_tokens", 16)), seed=int(body.get("seed") or 0),
                              stop=tuple(body.get("stop") or ()), logprobs=body.get("logprobs") is not None)
            with lock:
                r = backend.complete_batch([request])[0]
            if r.error:
                return self._send(400, {"error": {"message": r.error}})
            choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
            if request.logprobs:
                as_ids = body.get("return_tokens_as_token_ids")
                choice["logprobs"] = {"tokens": [f"token_id:{t}" if as_ids else backend.tok.decode([t])
                                                 for t in r.token_ids],
                                      "token_logprobs": r.token_logprobs, "top_logprobs": None, "text_offset": []}
            self._send(200, {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                             "model": name, "choices": [choice],
                             "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                                       "total_tokens": r.prompt_tokens + r.completion_tokens}})

        def log_message(self, fmt, *args):  # one line per request on stderr, like a server log
            print(f"{self.address_string()} {fmt % args}", flush=True)

    return Handler


def main() -> None:
    from data.synth.config import InProcessConfig
    from train.synth.inprocess import InProcessBackend

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="test-model")
    args = p.parse_args()
    backend = InProcessBackend(InProcessConfig(model=args.model, device="cpu", batch_size=1))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(backend, args.name))
    print(f"serving {args.model} as {args.name!r} on http://127.0.0.1:{args.port}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

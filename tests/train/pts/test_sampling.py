"""PTS rollouts through the synthetic-data engine's backends (train/pts/sampling.py): the in-process backend finds
the planted pivotal digit like the built-in sampler; request seeds; vLLM's token-id logprobs parsed; a real llama.cpp
server, which takes no token-id prompts, stops the run with exit 3 and its reason."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from data.synth.backend import Response, token_ids_from_logprobs
from tests.train.pts.test_run import real_run_inputs  # noqa: F401 (fixture)
from train.pts.config import PTSConfig
from train.pts.run import main
from train.pts.sampling import BackendSampler


def _backend_config(root, **backend) -> str:
    cfg = yaml.safe_load((root / "pts.yaml").read_text())
    name = f"via-{backend['kind']}"
    cfg.update(sampler="backend", model="", backend=backend, output=str(root / name / "pairs.jsonl"))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_inprocess_backend_finds_the_pivotal_digit(real_run_inputs):  # noqa: F811
    root, tok = real_run_inputs
    config = _backend_config(root, kind="inprocess", inprocess={"model": str(root / "model"), "device": "cpu",
                                                                "batch_size": 16})
    assert main([config]) == 0
    out = root / "via-inprocess"
    state = {r["id"]: r["status"] for r in map(json.loads, (out / "pairs.state.jsonl").read_text().splitlines())}
    assert state == {"q0": "kept", "q1": "kept", "q2": "too_hard", "q3": "too_hard"}
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    chain = tok.encode("The answer is ")
    digit = [p for p in pairs if p["position"] == len(chain)]
    assert len(digit) == 2 and all(p["chosen_ids"] == tok.encode("7") for p in digit)
    assert all(tok.decode(p["rejected_ids"]).isdigit() and p["prompt_ids"][-len(chain):] == chain for p in digit)


def test_request_seeds_follow_question_prefix_and_rollout():
    cfg = PTSConfig(model="m", questions="q", output="o", temperature=0.7)
    sampler = BackendSampler(backend=None, cfg=cfg)
    a = [r.seed for r in sampler.for_question(1).requests([5, 6, 7], 4, 10)]
    assert a == [r.seed for r in sampler.for_question(1).requests([5, 6, 7], 4, 10)] and len(set(a)) == 4
    assert a != [r.seed for r in sampler.for_question(2).requests([5, 6, 7], 4, 10)]
    assert a != [r.seed for r in sampler.for_question(1).requests([5, 6, 7, 8], 4, 10)]
    r = sampler.requests([5, 6, 7], 1, 10)[0]
    assert r.kind == "completion" and r.prompt_ids == (5, 6, 7) and r.logprobs and r.temperature == 0.7
    sampler.close()


def test_generation_from_a_response_puts_back_a_dropped_stop_token():
    sampler = BackendSampler(backend=None, cfg=PTSConfig(model="m", questions="q", output="o"))
    g = sampler._generation(Response(finish_reason="stop", token_ids=[11, 12], token_logprobs=[-0.1, -0.2]))
    assert (g.tokens, g.logprobs, g.finished) == ([11, 12, 100265], [-0.1, -0.2, 0.0], True)
    g = sampler._generation(Response(finish_reason="length", token_ids=[11, 12], token_logprobs=[-0.1, -0.2]))
    assert (g.tokens, g.finished) == ([11, 12], False)
    sampler.close()


def test_vllm_token_id_logprobs_are_parsed_and_token_text_is_refused():
    ids, logps = token_ids_from_logprobs(SimpleNamespace(tokens=["token_id:791", "token_id:100265"],
                                                         token_logprobs=[-0.5, None]))
    assert ids == [791, 100265] and logps == [-0.5, 0.0]
    with pytest.raises(ValueError, match="token text"):
        token_ids_from_logprobs(SimpleNamespace(tokens=["The"], token_logprobs=[-0.5]))
    with pytest.raises(ValueError, match="no per-token logprobs"):
        token_ids_from_logprobs(None)


@pytest.mark.slow
def test_a_server_without_token_id_prompts_stops_the_run_with_exit_3(real_run_inputs, tmp_path, capsys):  # noqa: F811
    from tests.data.synth.test_real_server import start_server, stop_server
    from train.export.gguf import to_gguf
    from train.checkpoint import load_model

    root, tok = real_run_inputs
    model, _ = load_model(root / "model", "cpu", None)
    to_gguf(model.float(), tmp_path / "m.gguf", "f32", tokenizer=tok)
    server = start_server(tmp_path / "m.gguf", tmp_path / "server.log")
    try:
        config = _backend_config(root, kind="openai", openai={"base_url": server["base_url"],
                                                              "model": server["model"], "max_retries": 0})
        assert main([config]) == 3
    finally:
        stop_server(server)
    err = capsys.readouterr().err
    # llama_cpp.server validates `prompt` as text and answers a token-id list with HTTP 500 (not 4xx), which the
    # client treats as a server failure: the run stops at once with the server's own reason
    assert "InternalServerError" in err and "'loc': ('body', 'prompt', 'str')" in err, err[-2000:]
    assert not (root / "via-openai" / "pairs.state.jsonl").read_text()  # no question recorded as done

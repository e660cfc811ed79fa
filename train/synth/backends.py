"""The backend a config names: data/synth's server and vLLM backends, or our own model in process."""
from __future__ import annotations

from data.synth.backend import OpenAIBackend, VLLMOfflineBackend
from data.synth.config import BackendConfig


def make_backend(b: BackendConfig):
    """The backend a BackendConfig names (the in-process one loads our model, so it is imported only when asked)."""
    if b.kind == "openai":
        return OpenAIBackend(b.openai)
    if b.kind == "vllm":
        return VLLMOfflineBackend(b.vllm)
    from train.synth.inprocess import InProcessBackend

    return InProcessBackend(b.inprocess)

"""`python -m train`, except that rank 0 sends itself SIGTERM as soon as it has written its first chunk of DPO
reference log-probs: a preemption landing in the middle of the reference pass, at a point a test can rely on."""
from __future__ import annotations

import os
import runpy
import signal

import train.stages.ref_cache as ref_cache

_compute_ref_logps = ref_cache.compute_ref_logps


def _signalled_after_first_chunk(*args, **kwargs):
    fired = []

    def on_chunk(k: int) -> None:
        if os.environ.get("RANK", "0") == "0" and not fired:
            fired.append(k)
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's StopRequested, as a real preemption

    return _compute_ref_logps(*args, on_chunk=on_chunk, **kwargs)


ref_cache.compute_ref_logps = _signalled_after_first_chunk

if __name__ == "__main__":
    runpy.run_module("train", run_name="__main__")  # `python -m train`, with its exit

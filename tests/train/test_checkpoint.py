"""Checkpoints that cannot lie or run code: a planted pickle never runs, a corrupt file is named and skipped on resume,
every load path verifies first, and a crash leaves "failed" in exit_status.json."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.train import check, exit_status, make_sources, run_train, train_losses, write_run_config
from train.checkpoint import (META, CheckpointError, find_resumable, load_model, resolve_checkpoint_dir, safe_loading,
                              verify)

pytestmark = pytest.mark.slow  # real trainer processes


class _Payload:
    """Unpickling this runs a shell command: what an attacker plants in a checkpoint directory."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"module": _Payload(marker)}, f)


def _rehash(tag_dir: Path) -> None:
    """An attacker who also rewrites the completion record: hashes match, so only safe loading stands between."""
    from data.fileio import sha256_file

    meta = json.loads((tag_dir / META).read_text())
    for rel in meta["files"]:
        f = tag_dir / rel
        meta["files"][rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (tag_dir / META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ZeRO-1 run of 4 steps with checkpoints at steps 2 and 4, copied fresh for each test."""
    root = tmp_path_factory.mktemp("ckpt")
    sources = make_sources(root / "shards", docs_per_source=40)
    cfg = write_run_config(root / "run.yaml", sources, root / "run", train={"max_steps": 4, "save_every": 2},
                           deepspeed={"zero_stage": 1})
    check(run_train(cfg))
    return root, cfg


def _copy(trained, tmp_path) -> tuple[Path, Path]:
    root, cfg = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    text = cfg.read_text().replace(str(root / "run"), str(run))
    new_cfg = tmp_path / "run.yaml"
    new_cfg.write_text(text)
    return run, new_cfg


def test_every_file_is_recorded_and_verifies(trained):
    root, _ = trained
    tag_dir, meta = resolve_checkpoint_dir(root / "run")
    assert tag_dir.name == "step_00000004"
    names = {p.name for p in tag_dir.iterdir() if p.name != META}
    assert set(meta["files"]) == names and all(len(v["sha256"]) == 64 for v in meta["files"].values())
    verify(tag_dir, meta)


def test_planted_pickle_does_not_run_on_any_load_path(trained, tmp_path):
    run, cfg = _copy(trained, tmp_path)
    tag_dir = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    _plant(tag_dir / "mp_rank_00_model_states.pt", marker)
    _rehash(tag_dir)
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        with safe_loading():
            torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)  # what DeepSpeed asks for
    with pytest.raises(Exception):
        load_model(run)  # eval and PTS load through this
    proc = run_train(cfg, ["train.max_steps=4"])  # resume=auto: DeepSpeed's loader under safe_loading
    assert proc.returncode != 0
    export = tmp_path / "hf"
    from train.export.run import main as export_main

    with pytest.raises(Exception):
        export_main([str(run), str(export)])
    assert not marker.exists(), "the planted pickle ran"
    assert exit_status(run)["status"] == "failed" and exit_status(run)["message"]


def test_bit_flip_is_named_and_resume_falls_back_to_a_verified_checkpoint(trained, tmp_path):
    run, cfg = _copy(trained, tmp_path)
    reference = train_losses(run)
    newest = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)  # a 4 KB bit rot in the weights
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt does not match its recorded sha256"):
        resolve_checkpoint_dir(run)  # export, init_from, eval, PTS
    found = find_resumable(run)
    assert found is not None and found[0].name == "step_00000002"
    proc = run_train(cfg)  # resume=auto: from step 2, then steps 3-4 again
    check(proc)
    assert "not resuming from" in proc.stderr and "step_00000004" in proc.stderr
    assert train_losses(run)[4] == reference[4]  # the same losses as the run that was never corrupted


def test_truncated_and_deleted_files_are_named(trained, tmp_path):
    run, _ = _copy(trained, tmp_path)
    tag_dir = run / "checkpoints" / "step_00000004"
    optim = next(tag_dir.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{optim.name} has 100 bytes"):
        resolve_checkpoint_dir(tag_dir)
    optim.unlink()
    with pytest.raises(CheckpointError, match=f"{optim.name} is missing"):
        resolve_checkpoint_dir(tag_dir)
    (tag_dir / "extra.pt").write_bytes(b"x")
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    assert find_resumable(run) is None  # nothing verifies: a fresh start, never a load of garbage


def test_a_crash_after_start_writes_failed(tmp_path):
    sources = make_sources(tmp_path / "shards", docs_per_source=40)
    bad_hf = tmp_path / "not_a_model"
    bad_hf.mkdir()
    (bad_hf / "config.json").write_text("{}")
    cfg = write_run_config(tmp_path / "run.yaml", sources, tmp_path / "run",
                           train={"max_steps": 2, "init_from": str(bad_hf)})
    proc = run_train(cfg)
    assert proc.returncode == 1
    status = exit_status(tmp_path / "run")
    assert status["status"] == "failed" and status["message"]


def test_changing_the_schedule_on_resume_is_refused_before_compute(trained, tmp_path):
    run, cfg = _copy(trained, tmp_path)
    proc = run_train(cfg, ["train.max_steps=6"])
    assert proc.returncode == 2
    assert "train.max_steps: 4 -> 6" in proc.stderr and "train.init_from" in proc.stderr

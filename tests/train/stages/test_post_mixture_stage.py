"""Post-training mixtures in the trainer: the shares and the DPO 1-5% warning reach metrics.jsonl and the recipe
summary; a real SFT run on two weighted sources (slow)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from data.config import DataConfig, PostSourceConfig
from data.post_batches import sft_batches
from tests.data.test_post_mixture import pair_rows
from tests.data.test_sft import conversation, write_chats
from tests.helpers.files import write_jsonl
from tests.helpers.models import TINY, as_overrides
from tests.helpers.train import check, metrics, run_train
from train.config import load_config
from train.recipe.summary import write_summary
from train.stages.dpo import DPOStage


def test_summary_shows_the_last_drawn_shares_and_the_dpo_warning(tmp_path, tok):
    paths = [write_chats(tmp_path / f"{n}.jsonl", [conversation(k + 40 * i) for k in range(40)])
             for i, n in enumerate(("chat", "safety"))]
    sources = [PostSourceConfig(name="chat", path=paths[0], weight=0.92),
               PostSourceConfig(name="safety", path=paths[1], weight=0.08, role="safety")]
    batches = sft_batches(DataConfig(sft_sources=sources, seed=1), seq_len=256, micro_batch=1, global_batch=2,
                          tokenizer=tok)
    for i in range(2):
        write_jsonl(tmp_path / f"{i}.jsonl", pair_rows(10, str(i)))
    cfg = load_config("configs/smoke/dpo.yaml", [f"train.init_from={tmp_path}"])
    cfg.data = DataConfig(dpo_sources=[PostSourceConfig(name="pts", path=str(tmp_path / "0.jsonl"), weight=0.92),
                                       PostSourceConfig(name="safety", path=str(tmp_path / "1.jsonl"), weight=0.08,
                                                        role="safety")])
    stage = DPOStage(cfg, batches=None)
    run = tmp_path / "out" / "dpo"
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            for _ in range(2):
                next(batches)
            record = {"step": step, "loss": 1.0 / step, "lr": 1e-3, **batches.metrics(),
                      **stage.step_metrics({"rewards_accuracy": 1.0}, 2)}
            f.write(json.dumps(record) + "\n")
    last = batches.metrics()
    recipe = SimpleNamespace(stages=[SimpleNamespace(name="dpo", kind="train")])
    summary = write_summary(tmp_path / "out", recipe, [{"status": "completed", "seconds": 1.0}])
    entry = summary["stages"][0]
    assert entry["shares"] == {"chat": last["data/share/chat"], "safety": last["data/share/safety"]}
    assert entry["safety_share_warning"] and entry["safety_share"] == pytest.approx(0.08)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert f"drawn shares chat {100 * last['data/share/chat']:.1f}%, safety" in md
    assert "WARNING: safety + hallucination share 8% is outside the Phi-4 report's 1-5%" in md


@pytest.mark.slow
def test_sft_run_on_two_weighted_sources_logs_the_drawn_shares(tmp_path):
    """A real `python -m train` SFT run (tiny model, from scratch) reading a 0.8 / 0.2 mixture of two files."""
    paths = [write_chats(tmp_path / f"{n}.jsonl", [conversation(k + 60 * i) for k in range(60)])
             for i, n in enumerate(("chat", "math"))]
    run_dir = tmp_path / "sft"
    sources = f"[{{name: chat, path: {paths[0]}, weight: 0.8}}, {{name: math, path: {paths[1]}, weight: 0.2}}]"
    overrides = ["data.sft_path=''", f"data.sft_sources={sources}", "train.init_from=''", f"output_dir={run_dir}",
                 *as_overrides(TINY), "train.seq_len=256", "train.global_batch=4", "train.micro_batch=2",
                 "train.max_steps=4", "train.save_every=4", "train.eval_every=0", "data.held_out_fraction=0.1",
                 "optim.lr=3e-3", "logging.wandb.mode=disabled", "deepspeed.zero_stage=0"]
    check(run_train("configs/smoke/sft.yaml", overrides))
    records = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    assert last["data/rows_consumed"] == 16
    assert last["data/share/chat"] + last["data/share/math"] == pytest.approx(1.0)
    assert abs(last["data/share/chat"] - 0.8) <= 0.05, last
    assert (run_dir / "sft_tokens" / "chat" / "key.json").is_file()  # a token cache per source file

"""The learning-rate schedule (train.engine.lr_factor through the LambdaLR that build_engine hands to DeepSpeed):
every schedule step by step against values worked out by hand, warmup by steps and by fraction, the floor, the last
step, and a resume in the middle that continues with the same rates."""
from __future__ import annotations

import pytest
import torch

from train.config import SCHEDULES, load_config
from train.engine import SkipNonFiniteAdamW, lr_factor, param_groups

PEAK = 0.5  # optim.lr in the configs below


def run_config(schedule: str, *overrides: str):
    return load_config(None, ["train.max_steps=10", f"optim.lr={PEAK}", f"optim.schedule={schedule}", *overrides])


def optimizer_and_schedule(cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Our AdamW over a module with a decayed (2-D) and an undecayed (1-D) group, and the LambdaLR, as build_engine
    builds them before passing both to deepspeed.initialize (which steps the scheduler once per optimizer step)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)  # weight: weight decay; bias: none
    o = cfg.optim
    optimizer = SkipNonFiniteAdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                   fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler


def rates(optimizer, scheduler, steps: int) -> list[float]:
    """The rate each of `steps` optimizer updates uses (every group's, checked equal), stepping as DeepSpeed does."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = []
    for _ in range(steps):
        group_lrs = {g["lr"] for g in optimizer.param_groups}
        assert len(group_lrs) == 1 and scheduler.get_last_lr() == [group_lrs.pop()] * len(optimizer.param_groups)
        out.append(scheduler.get_last_lr()[0])  # what train/loop.py logs as this step's `lr`
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    return out


def check_schedule(cfg, factors: list[float]) -> None:
    """factors[k]: the peak's multiplier at optimizer step k (0-based), by hand; checked through lr_factor and the
    optimizer's actual rates for every step of the run."""
    assert len(factors) == cfg.train.max_steps
    assert [lr_factor(k, cfg) for k in range(len(factors))] == pytest.approx(factors, abs=1e-12)
    optimizer, scheduler = optimizer_and_schedule(cfg)
    assert rates(optimizer, scheduler, len(factors)) == pytest.approx([PEAK * f for f in factors], abs=1e-12)


# cos(pi k / 8) for k = 1, 2, 3: the cosine schedule's points over 8 decay steps
COS_1_8, COS_2_8, COS_3_8 = 0.9238795325112867, 0.7071067811865476, 0.3826834323650898


def test_every_schedule_is_covered_here():
    """A new schedule must get its table below."""
    assert set(SCHEDULES) == {"linear", "cosine", "wsd", "constant"}


def test_linear_warmup_then_linear_decay_towards_zero():
    # warmup 2 steps: 1/2, 2/2; then 1 - (k - 2) / 8, reaching 0 at step 10 (one past the last step taken)
    check_schedule(run_config("linear", "optim.warmup_steps=2"),
                   [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    cfg = run_config("linear", "optim.warmup_steps=2")
    assert lr_factor(10, cfg) == 0.0 and lr_factor(15, cfg) == 0.0  # past the end: the floor, never negative


def test_linear_without_warmup_starts_at_the_peak():
    check_schedule(run_config("linear"), [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def test_linear_decays_to_min_lr_ratio():
    # 1 - 0.9 (k - 2) / 8: from the peak to 0.1 of it
    cfg = run_config("linear", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1")
    check_schedule(cfg, [0.5, 1.0, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125])
    assert lr_factor(10, cfg) == pytest.approx(0.1) and lr_factor(20, cfg) == pytest.approx(0.1)


def test_warmup_fraction_and_warmup_steps_precedence():
    # warmup_fraction 0.3 of 10 steps = 3 warmup steps: 1/3, 2/3, 3/3; then 1 - (k - 3) / 7
    check_schedule(run_config("linear", "optim.warmup_fraction=0.3"),
                   [1 / 3, 2 / 3, 1.0, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7])
    # warmup_steps wins over warmup_fraction when both are set
    check_schedule(run_config("linear", "optim.warmup_steps=2", "optim.warmup_fraction=0.3"),
                   [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_cosine_warmup_then_half_cosine():
    # 0.5 (1 + cos(pi (k - 2) / 8)) after 2 warmup steps
    c1, c2, c3 = ((1 + c) / 2 for c in (COS_1_8, COS_2_8, COS_3_8))
    check_schedule(run_config("cosine", "optim.warmup_steps=2"),
                   [0.5, 1.0, 1.0, c1, c2, c3, 0.5, 1 - c3, 1 - c2, 1 - c1])
    # with a floor: 0.1 + 0.9 of the same curve
    floor = lambda x: 0.1 + 0.9 * x  # noqa: E731
    check_schedule(run_config("cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"),
                   [0.5, 1.0, 1.0, *map(floor, [c1, c2, c3, 0.5, 1 - c3, 1 - c2, 1 - c1])])
    assert lr_factor(10, run_config("cosine", "optim.min_lr_ratio=0.1")) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    # 20 steps, warmup 3, decay_fraction 0.25: stable to step 14, then 1 - (k - 15) / 5 over steps 15..19
    cfg = load_config(None, ["train.max_steps=20", f"optim.lr={PEAK}", "optim.schedule=wsd", "optim.warmup_steps=3",
                             "optim.decay_fraction=0.25"])
    check_schedule(cfg, [1 / 3, 2 / 3] + [1.0] * 14 + [0.8, 0.6, 0.4, 0.2])
    assert lr_factor(20, cfg) == 0.0
    # with a floor, and the default decay_fraction 0.2 of 10 steps = 2 decay steps (8, 9): 1 - 0.5 (k - 8) / 2 ...
    cfg = run_config("wsd", "optim.warmup_steps=2", "optim.min_lr_ratio=0.5")
    check_schedule(cfg, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75])
    assert lr_factor(10, cfg) == 0.5  # ... reaching the floor one past the last step


def test_constant_after_warmup_ignores_the_floor():
    check_schedule(run_config("constant", "optim.warmup_fraction=0.3", "optim.min_lr_ratio=0.1"),
                   [1 / 3, 2 / 3] + [1.0] * 8)
    check_schedule(run_config("constant"), [1.0] * 10)


def test_the_smoke_pretraining_schedule():
    """configs/smoke/pretrain.yaml: lr 3e-3, 8 warmup steps, linear decay over the remaining 72 of 80 steps."""
    cfg = load_config("configs/smoke/pretrain.yaml")
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.max_steps) == (3e-3, "linear", 8, 80)
    optimizer, scheduler = optimizer_and_schedule(cfg)
    lrs = rates(optimizer, scheduler, 80)
    assert lrs[0] == pytest.approx(3e-3 / 8) and lrs[3] == pytest.approx(3e-3 * 4 / 8)
    assert lrs[7] == lrs[8] == pytest.approx(3e-3)  # the end of warmup is the start of the decay
    assert lrs[44] == pytest.approx(3e-3 / 2)  # halfway through the decay: 36 of 72 steps
    assert lrs[79] == pytest.approx(3e-3 / 72)  # the last step: one decay step before zero
    assert all(a > b for a, b in zip(lrs[8:], lrs[9:]))  # strictly decreasing after warmup


@pytest.mark.parametrize("schedule,extra", [("linear", ["optim.warmup_steps=3", "optim.min_lr_ratio=0.1"]),
                                            ("cosine", ["optim.warmup_fraction=0.2"]),
                                            ("wsd", ["optim.warmup_steps=2", "optim.decay_fraction=0.5"]),
                                            ("constant", ["optim.warmup_steps=4"])])
@pytest.mark.parametrize("stop_at", [1, 3, 7])
def test_resume_in_the_middle_continues_with_the_same_rates(schedule, extra, stop_at):
    """Stop after `stop_at` steps, load the optimizer's and scheduler's state_dicts (what a checkpoint holds) into
    fresh ones built from the config, and continue: the rates equal those of the run that never stopped."""
    cfg = run_config(schedule, *extra)
    straight = rates(*optimizer_and_schedule(cfg), 10)
    optimizer, scheduler = optimizer_and_schedule(cfg)
    first = rates(optimizer, scheduler, stop_at)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    assert saved_scheduler["last_epoch"] == stop_at

    fresh_optimizer, fresh_scheduler = optimizer_and_schedule(cfg)
    assert fresh_scheduler.get_last_lr()[0] == straight[0]  # a fresh schedule starts over ...
    fresh_optimizer.load_state_dict(saved_optimizer)
    fresh_scheduler.load_state_dict(saved_scheduler)  # ... until its state is loaded
    rest = rates(fresh_optimizer, fresh_scheduler, 10 - stop_at)
    assert first + rest == straight  # exactly: the same float operations
    assert len(set(straight)) > 2  # the schedule moves, so a resume from step 0 would show


def zero_section(*overrides: str, config: str = "configs/phi4-14b/pretrain.yaml", world: int = 1920) -> dict:
    from train.engine import deepspeed_config

    return deepspeed_config(load_config(config, list(overrides)), world, "bf16")["zero_optimization"]


def test_zero3_communication_is_derived_from_the_hidden_size():
    """Phi-4, h = 5120: reduce bucket h^2, prefetch 0.9 h^2, persistence threshold 10 h, overlap on; DeepSpeed's own
    config model reads every key back to the same value (so the names are DeepSpeed's, not just ours)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = zero_section()
    assert z == {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 26_214_400,
                 "stage3_prefetch_bucket_size": 23_592_960, "stage3_param_persistence_threshold": 51_200,
                 "stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 10**9,
                 "stage3_gather_16bit_weights_on_model_save": False}
    parsed = DeepSpeedZeroConfig(**z)
    assert (parsed.overlap_comm, parsed.reduce_bucket_size, parsed.prefetch_bucket_size,
            parsed.param_persistence_threshold, parsed.max_live_parameters, parsed.max_reuse_distance) == \
        (True, 26_214_400, 23_592_960, 51_200, 10**9, 10**9)
    narrow = zero_section("model.dim=2560")  # another hidden size, another derivation
    assert (narrow["reduce_bucket_size"], narrow["stage3_prefetch_bucket_size"],
            narrow["stage3_param_persistence_threshold"]) == (2560**2, int(0.9 * 2560**2), 25_600)


@pytest.mark.parametrize("key,value", [("overlap_comm", False), ("reduce_bucket_size", 5_000_000),
                                       ("stage3_prefetch_bucket_size", 7_000_000),
                                       ("stage3_param_persistence_threshold", 1),
                                       ("stage3_max_live_parameters", 3_000_000),
                                       ("stage3_max_reuse_distance", 4_000_000)])
def test_each_zero3_communication_key_overrides_its_derived_value(key, value):
    derived = zero_section()
    z = zero_section(f"deepspeed.{key}={str(value).lower()}")
    assert z[key] == value != derived[key]
    assert {k: v for k, v in z.items() if k != key} == {k: v for k, v in derived.items() if k != key}


def test_zero_0_to_2_communication_as_before():
    """ZeRO-1/2: 200M-element buckets, no overlap, reduce-scatter (the values this trainer always wrote); ZeRO-0:
    the stage alone (the engine all-reduces)."""
    for stage in (1, 2):
        assert zero_section(f"deepspeed.zero_stage={stage}", config="configs/smoke/sft.yaml", world=1) == {
            "stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 200_000_000,
            "allgather_bucket_size": 200_000_000, "reduce_scatter": True}
    assert zero_section("deepspeed.allgather_bucket_size=123", config="configs/smoke/sft.yaml",
                        world=1)["allgather_bucket_size"] == 123
    assert zero_section(config="configs/smoke/pretrain.yaml", world=1) == {"stage": 0}


def test_negative_communication_size_is_a_config_error():
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="deepspeed.reduce_bucket_size=-1; expected >= 0"):
        load_config("configs/phi4-14b/pretrain.yaml", ["deepspeed.reduce_bucket_size=-1"])

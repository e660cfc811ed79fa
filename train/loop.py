"""One training loop for every stage: `python -m train <config.yaml> [key=value ...]` (also under torchrun).

The stage object (train/stages/) brings the batch source and the loss; everything else (DeepSpeed engine, token-weighted
gradient accumulation, NaN guard, checkpoints, signals, logging) is shared.
Exit codes: 0 done, 2 configuration error (before any process group starts), 75 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (requeue and resume), 1 any other failure. The same status is written to
`<output_dir>/exit_status.json`, since torchrun reports every non-zero worker exit as 1.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.fileio import atomic_write
from data.shards import ShardError
from data.tokenizer import PAD_ID
from train import checkpoint
from train.config import REPO_ROOT, ConfigError, RunConfig, grad_accum_steps, load_config, save_config, to_dict
from train.distributed import (StoppedBeforeTraining, StopRequested, all_reduce_sum, env_world_size,
                               init_distributed, to_device)
from train.engine import build_engine, build_model, deepspeed_config
from train.metrics import MetricsLogger, git_commit, memory_gb, peak_tflops
from train.stages.build import build_stage, validate
from train.transition import check_transition

log = logging.getLogger("train")
EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_REQUEUE = 0, 1, 2, 75
USAGE = "usage: python -m train <config.yaml> [key=value ...]   (or: torchrun --nproc_per_node N -m train ...)"


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.stop = StopRequested()
        self.dist_state = None
        # The data is read and validated here, before a process group or a model exists (errors: exit 2).
        self.stage = build_stage(cfg, rank=int(os.environ.get("RANK", 0)), world_size=env_world_size())
        self.batches = self.stage.batches

    def run(self) -> int:
        """Train; any failure Python sees is recorded in exit_status.json as "failed" with the error."""
        try:
            return self._run()
        except BaseException as e:
            self._exit_status("failed", getattr(self, "step", 0), f"{type(e).__name__}: {e}")
            raise

    def _run(self) -> int:
        cfg = self.cfg
        self.dist_state = d = init_distributed(cfg.train.device, cfg.train.precision)
        logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING,
                            format=f"%(asctime)s [rank{d.rank}] %(name)s: %(message)s", force=True)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.accum = grad_accum_steps(cfg, d.world_size)
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self._exit_status("running", 0)

        resume = (checkpoint.find_resumable(self.run_dir, d.rank, d.world_size, d.device)
                  if cfg.train.resume == "auto" else None)
        universal = bool(resume and resume[1].get("world_size") != d.world_size and resume[1].get("zero_stage", 0) > 0)
        ds_config = deepspeed_config(cfg, d.world_size, d.precision, load_universal=universal)
        if d.is_main:
            atomic_write(self.run_dir / "deepspeed.json", json.dumps(ds_config, indent=2))
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every ZeRO stage
        model = build_model(cfg.model, ds_config, d)
        if resume is None and cfg.train.init_from:
            self.context = check_transition(cfg)  # checked in main() too, before any process group
            log.info("initialising weights from %s", checkpoint.init_weights_from(model, cfg.train.init_from, d.is_main))
        elif resume is not None:
            self.context = resume[1].get("context") or check_transition(cfg)
        else:
            self.context = check_transition(cfg)
        if cfg.train.compile:
            for layer in model.layers:
                layer.compile()
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, model, ds_config)

        self.step, self.tokens_seen, self.skipped = 0, 0, 0
        if resume is not None:
            tag_dir, meta = resume
            state = checkpoint.load(self.engine, tag_dir, universal=universal)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.skipped = state.get("skipped_steps", 0)
            self.batches.load_state_dict(state["data"])
            torch.set_rng_state(state["rng"]["torch"])
            log.info("resumed from %s at step %d (saved by %d ranks, now %d)", tag_dir, self.step,
                     meta.get("world_size"), d.world_size)
        elif cfg.train.resume == "auto" and (self.run_dir / "checkpoints").is_dir():
            log.warning("train.resume=auto: no complete checkpoint in %s; starting from step 0", self.run_dir)
        try:  # e.g. DPO's reference log-prob cache; a preemption signal stops it between chunks
            self.stage.before_training(self.engine, d, resumed=resume is not None,
                                       should_stop=lambda: self.stop.agreed(d.device))
        except StoppedBeforeTraining as e:
            log.warning("stopping before the first step (signal %d): %s; exit %d", self.stop.signal, e, EXIT_REQUEUE)
            self._exit_status("preempted", self.step, str(e))
            self._leave_process_group()
            return EXIT_REQUEUE
        self.metrics = MetricsLogger(self.run_dir, cfg.logging.wandb, to_dict(cfg), d.is_main, self.step,
                                     git_commit(REPO_ROOT) if d.is_main else "")
        self.peak_tflops = peak_tflops(cfg.logging.peak_tflops, d.device)
        log.info("stage=%s params=%s world=%d accum=%d steps=%d precision=%s zero=%d", cfg.stage,
                 f"{cfg.model.num_params():,}", d.world_size, self.accum, cfg.train.max_steps, d.precision,
                 cfg.deepspeed.zero_stage)
        try:
            code = self._loop()
        finally:
            self.metrics.close()
        self._leave_process_group()
        return code

    @staticmethod
    def _leave_process_group() -> None:
        """Leave the process group cleanly on every planned exit (gloo aborts at interpreter exit otherwise); on an
        exception the group is left alone so no rank waits on a dead peer."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _loop(self) -> int:
        cfg, d = self.cfg, self.dist_state
        bad_in_row, start_step = 0, self.step
        while self.step < cfg.train.max_steps:
            t_start = time.perf_counter()
            micro = [next(self.batches) for _ in range(self.accum)]
            t_data = time.perf_counter() - t_start
            values = self._train_step(micro)
            self.step += 1
            bad = values.pop("bad")
            bad_in_row = bad_in_row + 1 if bad else 0
            step_time = time.perf_counter() - t_start
            self._log(values, step_time, t_data)
            if bad_in_row >= cfg.train.max_bad_steps_in_row:
                self._save()
                msg = (f"{bad_in_row} steps in a row had a non-finite loss or gradient norm (last at step "
                       f"{self.step}); updates were skipped and a checkpoint saved. Lower optim.lr or inspect the data.")
                self._exit_status("failed", self.step, msg)
                raise RuntimeError(msg)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self._evaluate()
            stop_after = cfg.train.stop_after_steps
            if self.stop.agreed(d.device) or (stop_after and self.step - start_step >= stop_after
                                              and self.step < cfg.train.max_steps):
                self._save()
                log.warning("stopping at step %d (signal or train.stop_after_steps): checkpoint saved; exit %d",
                            self.step, EXIT_REQUEUE)
                self._exit_status("preempted", self.step)
                return EXIT_REQUEUE
            if self.step % cfg.train.save_every == 0 and self.step < cfg.train.max_steps:
                self._save()
        if not (cfg.train.eval_every and self.step % cfg.train.eval_every == 0):
            self._evaluate()
        self._save()
        self._exit_status("completed", self.step)
        return EXIT_OK

    def _train_step(self, micro: list[dict]) -> dict:
        """Loss averaged over the global batch's loss units (labelled tokens for LM stages, pairs for DPO)."""
        cfg, d, engine = self.cfg, self.dist_state, self.engine
        local_units = float(sum(self.stage.loss_units(mb) for mb in micro))
        local_tokens = float(sum(int((mb["input_ids"] != PAD_ID).sum()) for mb in micro))  # real, not padding
        n_units, n_tokens = all_reduce_sum([local_units, local_tokens], d.device)
        if n_units == 0:
            raise RuntimeError(f"step {self.step + 1}: the global batch has nothing to learn from (all labels -100)")
        # DeepSpeed divides by accumulation steps and averages over ranks; undo both so the gradient is
        # sum(loss) / n_units whatever the world size and however the units fall across micro-batches.
        scale = d.world_size * self.accum / n_units
        loss_sum, extras = torch.zeros((), dtype=torch.float64, device=d.device), {}
        grad_norm = None
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        for i, mb in enumerate(micro):
            loss, stats = self.stage.loss(engine, to_device(mb, d.device))
            if self.step + 1 in cfg.train.debug_nan_steps:
                loss = loss * float("nan")  # fault injection for tests
            loss_sum += loss.detach().double()
            for k, v in stats.items():
                extras[k] = extras.get(k, 0.0) + float(v)
            engine.backward(loss * scale)
            if i == len(micro) - 1 and cfg.deepspeed.zero_stage == 0:
                grad_norm = self._local_grad_norm()  # stage 0: gradients are already all-reduced here
            engine.step()
        total_loss, *extra_sums = all_reduce_sum([loss_sum.item(), *extras.values()], d.device)
        if grad_norm is None:
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        loss = total_loss / n_units
        skipped = getattr(self.optimizer, "last_step_skipped", False)
        self.skipped += int(skipped)
        self.tokens_seen += int(n_tokens)
        values = {"loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens_seen": self.tokens_seen,
                  "train/skipped_steps": self.skipped, "train/ds_skipped_steps": int(engine.skipped_steps),
                  "bad": skipped or not math.isfinite(loss) or not math.isfinite(grad_norm)}
        values.update(self.stage.step_metrics(dict(zip(extras, extra_sums)), n_units))
        if values["bad"]:
            log.warning("step %d: non-finite loss %.4g / grad norm %.4g: update skipped", self.step + 1, loss,
                        grad_norm)
        self._step_tokens = n_tokens
        return values

    def _local_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
        return float(torch.linalg.vector_norm(norms))  # one device sync, not one per parameter

    def _log(self, values: dict, step_time: float, data_time: float) -> None:
        cfg, d = self.cfg, self.dist_state
        tokens_per_s = self._step_tokens / step_time
        tflops = cfg.model.flops_per_token(cfg.train.seq_len) * tokens_per_s / d.world_size / 1e12
        values.update({
            "tokens_per_s": tokens_per_s, "perf/tflops_per_device": tflops, "perf/mfu": tflops / self.peak_tflops,
            "perf/step_time_s": step_time, "perf/data_wait_frac": data_time / step_time,
            "perf/memory_gb": memory_gb(d.device),
        })
        values.update(self.batches.metrics())
        if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
            self.metrics.log(self.step, values)
            log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g tok/s %.0f mfu %.3f", self.step,
                     cfg.train.max_steps, values["loss"], values["lr"], values["grad_norm"], tokens_per_s,
                     values["perf/mfu"])

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Held-out loss per source (sharded over ranks, all-reduced), plus train.eval_config's tasks."""
        results = self._benchmark_eval()
        held_out = self.batches.held_out_batches(self.cfg.train.eval_batches)
        if not held_out and not results:
            return
        self.engine.eval()
        for name, batches in held_out.items():  # this rank's share; every rank has the same count (ZeRO-3)
            sums = [0.0, 0.0]
            for mb in batches:
                loss, _ = self.stage.loss(self.engine, to_device(mb, self.dist_state.device))
                sums[0] += float(loss)
                sums[1] += self.stage.loss_units(mb)
            total, count = all_reduce_sum(sums, self.dist_state.device)
            results[f"eval/loss/{name}"] = total / max(count, 1)
        self.engine.train()
        self.metrics.log(self.step, results)
        log.info("eval at step %d: %s", self.step, {k: round(v, 4) for k, v in results.items()})

    def _benchmark_eval(self) -> dict:
        """train.eval_config's tasks (multiple choice, generative, perplexity, recall) on the live model."""
        if not self.cfg.train.eval_config:
            return {}
        from data.tokenizer import Phi4Tokenizer
        from train.eval.config import EvalConfig
        from train.eval.run import evaluate

        if not hasattr(self, "_eval_setup"):
            self._eval_setup = (load_config(self.cfg.train.eval_config, schema=EvalConfig), Phi4Tokenizer())
        eval_cfg, tokenizer = self._eval_setup
        return evaluate(self.engine.module, tokenizer, eval_cfg, self.dist_state.device)  # same work on every rank

    def _save(self) -> None:
        d = self.dist_state
        client_state = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped,
                        "data": self.batches.state_dict(), "rng": {"torch": torch.get_rng_state()},
                        "config": to_dict(self.cfg)}
        meta = {"world_size": d.world_size, "zero_stage": self.cfg.deepspeed.zero_stage, "precision": d.precision,
                "stage": self.cfg.stage, "tokens_seen": self.tokens_seen, "config": to_dict(self.cfg),
                "context": self.context}  # the longest context trained so far and theta (train/transition.py)
        local_main = int(os.environ.get("LOCAL_RANK", 0)) == 0
        tag_dir = checkpoint.save(self.engine, self.run_dir, self.step, client_state, meta,
                                  self.cfg.train.keep_last, d.is_main, local_main)
        log.info("saved checkpoint %s", tag_dir)

    def _exit_status(self, status: str, step: int, message: str = "") -> None:
        """Rank 0 records the run's state; "running" carries the host and pid, so a reader can tell a live run
        from one that died without a word (killed by the OOM killer, SIGKILL, a node failure)."""
        is_main = self.dist_state.is_main if self.dist_state else int(os.environ.get("RANK", 0)) == 0
        if not is_main:
            return
        record = {"status": status, "step": step, "message": message, "time": time.time()}
        if status == "running":
            record.update(host=socket.gethostname(), pid=os.getpid())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / "exit_status.json", json.dumps(record))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK if args else EXIT_CONFIG
    try:
        cfg = load_config(args[0], args[1:])
        grad_accum_steps(cfg, env_world_size())
        validate(cfg)
        check_resume_schedule(cfg)
        if cfg.train.init_from and not (cfg.train.resume == "auto" and checkpoint.find_latest(cfg.output_dir)):
            check_transition(cfg)  # theta / context changes only in a midtrain stage
        trainer = Trainer(cfg)  # reads and validates the stage's data
    except (ConfigError, FileNotFoundError, ValueError, ShardError) as e:  # the data errors name file and line
        print(f"configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return trainer.run()


# What the LR at every step depends on: resuming with another value would jump or repeat the schedule.
SCHEDULE_KEYS = ("train.max_steps", "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.warmup_fraction",
                 "optim.min_lr_ratio", "optim.decay_fraction")


def check_resume_schedule(cfg: RunConfig) -> None:
    """Refuse to resume a run whose LR schedule changed: the saved scheduler would continue the old curve."""
    if cfg.train.resume != "auto":
        return
    found = checkpoint.find_latest(cfg.output_dir)
    if found is None or "config" not in found[1]:
        return
    saved, now = found[1]["config"], to_dict(cfg)
    changed = []
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        if saved.get(section, {}).get(name) != now[section][name]:
            changed.append(f"{key}: {saved.get(section, {}).get(name)} -> {now[section][name]}")
    if changed:
        raise ConfigError(f"{cfg.output_dir}: resuming from {found[0].name} with a changed LR schedule ("
                          + "; ".join(changed) + "). A resumed run continues its saved schedule exactly; to train "
                          "longer or differently, start a new stage with train.init_from=" + str(cfg.output_dir)
                          + " in a new output_dir, or set train.resume=none to start this one over.")

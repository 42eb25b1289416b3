"""The training loop: mesh, sharded init, jitted steps, progress, metrics, eval, checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from tqdm.auto import tqdm

import input_pipeline
import sharding
from jaxmoe import config as config_lib
from jaxmoe import startup_signals
from jaxmoe.checkpoint import manager as ckpt
from jaxmoe.checkpoint.damage import CheckpointError
from jaxmoe.checkpoint.init_from import check_source
from jaxmoe.checkpoint.preemption import PreemptionGuard
from jaxmoe.checkpoint.run import RunCheckpointer
from jaxmoe.inference.sample import greedy_generate
from jaxmoe.model.moe.block import expert_dispatch
from jaxmoe.model.params import (
    active_params,
    human_count,
    total_params,
    training_flops_per_token,
)
from jaxmoe.staging import write_text_atomic
from jaxmoe.train.metrics import MetricsWriter, StepTimer, read_metrics
from jaxmoe.train.optimizer import learning_rate_schedule, make_optimizer
from jaxmoe.train.run_dir import check_run_dir, run_lock
from jaxmoe.train.state import TrainState, init_state, model_graphdef
from jaxmoe.train.step import make_eval_step, make_train_step
from sharding.multihost import said_by


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one config on one mesh (reused by tests and tools)."""

    cfg: config_lib.Config
    mesh: jax.sharding.Mesh
    rules: Any
    graphdef: Any
    state_sharding: Any
    batch_sharding: Any
    train_step: Any
    eval_step: Any
    init: Any
    schedule: Any = None  # the learning-rate schedule train_step applies: schedule(step - 1)

    @functools.cached_property
    def data_shard(self) -> tuple[int, int]:
        """(this process's data shard, number of shards): processes holding the same batch
        rows read the same shard (`sharding.batch_rows`); a ConfigError when the mesh gives
        processes rows that are not equal blocks."""
        try:
            return sharding.batch_rows(self.batch_sharding,
                                       (self.cfg.train.batch_size, self.cfg.data.seq_len))
        except sharding.MultiHostError as e:
            raise config_lib.ConfigError(f"mesh {dict(self.mesh.shape)}: {e}") from None

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Process-local numpy batch (this process's data shard's rows) -> global arrays
        sharded over the batch axes. The global shape is given: without it, processes that
        hold the same rows made a batch of one shard's rows."""
        shards = self.data_shard[1]
        return {k: jax.make_array_from_process_local_data(
                    self.batch_sharding, v, (v.shape[0] * shards, *v.shape[1:]))
                for k, v in local_batch.items()}

    def context(self):
        """Mesh + logical rules, so activation constraints inside the model take effect."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(flax_spmd.logical_axis_rules(self.rules))
        return stack


def _traced_with(fn, dispatch):
    """`fn` with the MoE expert dispatch installed while jit traces it (None: built-in)."""
    if dispatch is None:
        return fn

    def traced(*args):
        with expert_dispatch(dispatch):
            return fn(*args)

    return traced


def build_trainer(cfg: config_lib.Config, devices=None) -> Trainer:
    """Mesh (validated against the model and batch), shardings and jitted steps for `cfg`.

    `devices` defaults to all devices; TPU topology devices (compile-only) work too."""
    config_lib.check_trainable(cfg)
    rules = sharding.make_rules(cfg.mesh.rules)
    mesh = sharding.mesh_from_config(cfg, rules, devices)
    # A dense model has no MoE block to call the dispatch: its rules need not suit one.
    dispatch = sharding.make_expert_dispatch(mesh, rules, cfg.mesh.expert_all_to_all,
                                             cfg.mesh.expert_buffer_factor) \
        if cfg.model.num_experts else None
    tx = make_optimizer(cfg.train.optimizer, cfg.train.steps)
    schedule = learning_rate_schedule(cfg.train.optimizer, cfg.train.steps)
    graphdef = model_graphdef(cfg.model)
    abstract = jax.eval_shape(lambda: init_state(cfg.model, tx, cfg.train.seed))
    sharding.check_overrides(abstract.params, mesh, rules, cfg.mesh.rules, sharding.MeshError)
    sharding.check_params_divide(abstract.params, dict(mesh.shape), rules)
    state_sh = sharding.state_shardings(abstract, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    init = jax.jit(lambda: init_state(cfg.model, tx, cfg.train.seed), out_shardings=state_sh)
    train_step = jax.jit(_traced_with(make_train_step(graphdef, cfg, tx, schedule), dispatch),
                         in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                         donate_argnums=(0,))
    eval_step = jax.jit(_traced_with(make_eval_step(graphdef, cfg.train.grad_accum_steps),
                                     dispatch), in_shardings=(state_sh, batch_sh))
    return Trainer(cfg, mesh, rules, graphdef, state_sh, batch_sh, train_step, eval_step, init,
                   schedule)


def batch_shards(trainer: Trainer) -> int:
    """How many ways the mesh splits a batch (the product of the mesh axes `batch` maps to)."""
    rows = trainer.mesh.size  # a multiple of every split
    return rows // trainer.batch_sharding.shard_shape((rows, 1))[0]


def evaluate(trainer: Trainer, state: TrainState, batches) -> float:
    """Mean held-out cross-entropy (nats/token) over `batches`."""
    ce, tokens = 0.0, 0.0
    with trainer.context():
        for b in batches:
            out = trainer.eval_step(state, trainer.put_batch(b))
            ce += float(out["ce_sum"])
            tokens += float(out["tokens"])
    return ce / max(tokens, 1.0)


def _eval_batches(cfg: config_lib.Config, per_process_batch: int,
                  shard: tuple[int, int] | None = None) -> list[dict[str, np.ndarray]]:
    """`train.eval_batches` held-out batches. The eval split is finite: when this process's
    shard runs out, all-padding batches (no tokens, so no weight) keep every process running
    the same number of eval steps. `shard`: (this process's data shard, shards), default
    (process index, process count) (see `sharding.batch_rows`)."""
    index, count = shard or (jax.process_index(), jax.process_count())
    it = input_pipeline.make_dataset(cfg.data, split="eval", batch_size=per_process_batch,
                                     seed=cfg.data.seed, process_index=index,
                                     process_count=count, num_epochs=1)
    batches = []
    for _ in range(cfg.train.eval_batches):
        try:
            batches.append(next(it))
        except StopIteration:
            shape = (per_process_batch, cfg.data.seq_len)
            batches.append({k: np.zeros(shape, np.int32) for k in input_pipeline.BATCH_KEYS})
    tokens = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)
    if jax.process_count() > 1:  # every process decides alike, or the others would hang
        from jax.experimental import multihost_utils

        tokens = int(np.sum(multihost_utils.process_allgather(np.asarray(tokens, np.int64))))
    if not tokens:
        bad = it.stats().bad_records
        why = (f" ({sum(bad.values())} held-out records were bad: "
               + ", ".join(f"{k} {v}" for k, v in sorted(bad.items())) + ")") if bad else ""
        if "missing_field" in bad:  # most likely the reader's settings, not the split's size
            key = ("data.sources[*].text_field" if cfg.data.source == "mixture"
                   else f"data.text_field={cfg.data.text_field!r}")
            raise config_lib.ConfigError(
                f"{key}: the held-out split gave no tokens{why}; expected records that "
                "data.source reads with that field (check data.source and data.text_field; "
                "or, if only a few records are held out, a larger data.eval_fraction)")
        files = [p for s in cfg.data.source_configs() for p in s.eval_paths]
        if files:  # the held-out records are these files; eval_fraction plays no part
            name = ("data.eval_paths" if cfg.data.source != "mixture"
                    else "data.sources[*].eval_paths")
            raise config_lib.ConfigError(
                f"{name}={files}: the held-out files gave no tokens{why}; expected documents "
                "in them")
        raise config_lib.ConfigError(
            f"data.eval_fraction={cfg.data.eval_fraction}: the held-out split gave no "
            f"tokens{why}; expected a larger fraction or corpus")
    return batches


def _percent(share: float) -> str:
    """`share` (below 1) as a percentage that does not round up to 100%."""
    text = f"{100 * share:.3g}"
    return (text if float(text) < 100 else ">99.9") + "%"


def _warmup_note(cfg: config_lib.Config, schedule) -> str | None:
    """A note when the run ends before its warm-up does, from `schedule` (the one the train
    step applies). Step k applies schedule(k - 1): optax counts from 0, as Hugging Face's
    schedules do, so step 1 runs at rate 0 and train.steps <= warmup_steps never reaches
    the peak. None when the run reaches it."""
    steps, opt = cfg.train.steps, cfg.train.optimizer
    if opt.warmup_steps < steps:
        return None
    rates = np.asarray(schedule(np.arange(steps)), np.float64)  # steps <= warmup_steps
    largest, at = float(rates.max()), int(rates.argmax()) + 1
    head = (f"note: train.optimizer.warmup_steps={opt.warmup_steps} >= train.steps={steps}: "
            "the run ends in warm-up")
    if largest == 0:
        return (f"{head}; its only step runs at learning rate 0 (the warm-up starts from 0), "
                "so the optimizer changes no parameter")
    return (f"{head}; the largest learning rate it applies is {largest:.3g} at step {at} "
            f"({_percent(largest / opt.learning_rate)} of train.optimizer.learning_rate="
            f"{opt.learning_rate:g})")


def _throughput(step_time: float, step_tokens: list[float],
                flops_per_token: float) -> dict[str, float]:
    """Metrics of a logged interval from its mean seconds a step and each of its steps'
    tokens (they vary when sequences are not packed): the rates are the interval's tokens
    over its time, not the last step's tokens over the mean step time."""
    tokens_per_s = float(np.mean(step_tokens)) / step_time
    return {"step_time_s": step_time, "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12}


def train(cfg: config_lib.Config, run_dir: str | Path, *, progress: bool = True,
          sample: bool = True) -> dict[str, Any]:
    """Trains `cfg` for `cfg.train.steps` steps; returns a summary (losses, paths, sample)."""
    with contextlib.ExitStack() as held:  # the run directory's lock, once it is taken
        return _train(cfg, Path(run_dir), held, progress=progress, sample=sample)


def _claim_run_dir(run_dir: Path, held: contextlib.ExitStack, locked: bool, *,
                   create: bool) -> bool:
    """Process 0 makes `run_dir` (when `create`) and, if it exists, locks it for this run
    (run_dir.run_lock), unless it already holds the lock (`locked`). A refusal raises the
    same one-line ConfigError in every process: the others would otherwise wait at their
    next barrier. Returns whether process 0 holds the lock (False elsewhere)."""
    problem = ""
    if jax.process_index() == 0 and not locked:
        try:
            if create:
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise config_lib.ConfigError(
                        f"--run-dir {run_dir}: cannot be created ({e.strerror}); expected a "
                        "writable path") from None
            if run_dir.is_dir():
                held.enter_context(run_lock(run_dir))
                locked = True
        except config_lib.ConfigError as e:
            problem = str(e)
    if jax.process_count() > 1:
        problem = said_by(problem)  # as process 0 has it
    if problem:
        raise config_lib.ConfigError(problem)
    return locked


def _train(cfg: config_lib.Config, run_dir: Path, held: contextlib.ExitStack, *,
           progress: bool, sample: bool) -> dict[str, Any]:
    check_run_dir(run_dir)
    # A run directory that exists (a resume) is locked at once: a second run on it stops
    # here, before it builds anything (or fails for a device the first one holds).
    locked = _claim_run_dir(run_dir, held, False, create=False)
    is_main = jax.process_index() == 0
    config_path = run_dir / "config.yaml"
    resuming = config_path.is_file()  # its config is replaced only once the resume succeeds
    tokenizer = input_pipeline.make_tokenizer(cfg.data)
    input_pipeline.check_vocab_fits(tokenizer, cfg.model.vocab_size)
    trainer = build_trainer(cfg)
    startup_signals.check()  # Ctrl-C so far: stop before compiling anything
    shard, shards = trainer.data_shard
    per_process = cfg.train.batch_size // shards
    seq_len = cfg.data.seq_len
    flops_per_token = training_flops_per_token(cfg.model, seq_len)["total"]
    if is_main:  # multi-host: one process speaks for all
        print(f"model: {human_count(total_params(cfg.model))} parameters, "
              f"{human_count(active_params(cfg.model))} active; mesh {dict(trainer.mesh.shape)}; "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
        note = _warmup_note(cfg, trainer.schedule)  # allowed: a short trial of a long run
        if note:
            print(note)

    train_iter = input_pipeline.make_dataset(
        cfg.data, split="train", batch_size=per_process, seed=cfg.train.seed,
        process_index=shard, process_count=shards)
    eval_data = _eval_batches(cfg, per_process, (shard, shards))

    if cfg.train.init_from:
        check_source(cfg.train.init_from, run_dir, jax.eval_shape(trainer.init).params)
    # A new run directory is made once the mesh and the data are known to work: a run
    # refused before it starts leaves no directory behind.
    _claim_run_dir(run_dir, held, locked, create=True)
    if is_main and not resuming:
        write_text_atomic(config_path, config_lib.dump_config(cfg))
    writer = MetricsWriter(run_dir, cfg.train.tensorboard, enabled=is_main)

    # Resume from the latest complete checkpoint in run_dir (parameters, optimizer, RNG,
    # router biases and the data iterator's position), or start fresh.
    checkpoints = RunCheckpointer(run_dir, cfg)
    state, start = checkpoints.restore_or_init(trainer, train_iter)
    startup_signals.check()
    # Rows past the checkpoint (or all rows, when a run died before its first checkpoint)
    # are trained and logged again: drop them so no step is logged twice.
    writer.resume_at(start)
    if start >= cfg.train.steps:
        checkpoints.close()
        writer.close()
        print(f"checkpoint: {checkpoints.path(start)} is at step {start} >= train.steps="
              f"{cfg.train.steps}; nothing to train (raise train.steps to continue: the "
              "learning-rate schedule is laid over train.steps, so the rate moves to where the "
              "longer schedule has it; or use a new --run-dir to start over)")
        return {"train": [], "eval": [], "run_dir": str(run_dir),
                "checkpoint": str(checkpoints.path(start))}
    if is_main and resuming:  # the config the run goes on with (not when nothing is trained)
        write_text_atomic(config_path, config_lib.dump_config(cfg))
    history: list[dict[str, float]] = []
    eval_history: list[dict[str, float]] = []
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and is_main),
               dynamic_ncols=True, desc="train")
    timer = StepTimer(start)
    timed_tokens: list[jax.Array] = []  # `tokens` of each step timed since the last lap
    try:
        writer.open_tensorboard()  # before the timed steps: opening it is not step time
        with PreemptionGuard() as guard:  # SIGTERM/SIGINT: save this step, then return
            for step in range(start + 1, cfg.train.steps + 1):
                batch = trainer.put_batch(next(train_iter))
                with trainer.context():
                    state, metrics = trainer.train_step(state, batch)
                if step == start + 1:  # it compiled the step: its time is not step time
                    jax.block_until_ready(metrics)
                    timer.restart(step)
                else:
                    timed_tokens.append(metrics["tokens"])  # on device: no wait here
                bar.update(1)  # before its loss is shown: the bar names the step the loss is of
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    metrics = jax.device_get(metrics)
                    step_time = timer.lap(step)
                    timing = {}
                    if step_time is not None:
                        metrics.update(_throughput(step_time, jax.device_get(timed_tokens),
                                                   flops_per_token))
                        timing = {"tok_s": f"{metrics['tokens_per_s']:,.0f}",
                                  "step_s": f"{step_time:.3f}"}
                    timed_tokens = []
                    loss = float(metrics["loss"])
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"step {step}: loss is {loss}; stopping (lower "
                                                 "train.optimizer.learning_rate or check the data)")
                    logged = time.perf_counter()
                    writer.write(step, "train", metrics)
                    history.append({"step": step, "loss": loss})
                    bar.set_postfix(loss=f"{loss:.3f}", **timing)
                    timer.pause(time.perf_counter() - logged)  # writing it is not step time
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    jax.block_until_ready(state)  # the train steps before it are not eval time
                    eval_start = time.perf_counter()
                    eval_loss = evaluate(trainer, state, eval_data)
                    writer.write(step, "eval", {"loss": eval_loss})
                    eval_history.append({"step": step, "loss": eval_loss})
                    if is_main:
                        bar.write(f"step {step}: eval loss {eval_loss:.4f}")
                    timer.pause(time.perf_counter() - eval_start)  # eval time is not step time
                checkpoints.maybe_save(step, state, train_iter)  # async: training continues
                if guard.should_stop(step):
                    break
            bar.close()
            # Inside the guard: a second signal during this save stops with one line (exit 130)
            checkpoints.save(step, state, train_iter, wait=True)
    except Exception as e:
        # An error (a diverged loss, a data or disk error) ends the run: a save already in
        # flight is of a checked state, so let it finish rather than leave a half-written
        # step and orbax's tracebacks from threads cut off at exit. Said first, so that a
        # Ctrl-C during a long wait does not hide the error.
        if checkpoints.manager.is_saving_in_progress():
            print(f"jaxmoe: stopping after an error ({e}); waiting for the checkpoint save "
                  "in flight to finish", file=sys.stderr, flush=True)
        try:
            checkpoints.close()
        except CheckpointError as failed:  # a save in flight that failed: not to be missed
            print(f"jaxmoe: also, {failed}", file=sys.stderr, flush=True)
        except Exception:
            pass  # the first error is the one reported
        with contextlib.suppress(Exception):  # e.g. a full disk: the first error is the one
            writer.close()
        raise
    checkpoints.close()
    writer.close()
    if is_main:  # the whole run's history, earlier segments of a resumed run included
        rows = read_metrics(run_dir)
        history = [{"step": r["step"], "loss": r["loss"]} for r in rows if r["split"] == "train"]
        eval_history = [{"step": r["step"], "loss": r["loss"]} for r in rows
                        if r["split"] == "eval"]
    if guard.received:
        print(f"checkpoint: {guard.signal_name} received; saved step {step} to "
              f"{checkpoints.path(step)}; exiting")
        return {"train": history, "eval": eval_history, "run_dir": str(run_dir),
                "checkpoint": str(checkpoints.path(step)), "preempted_at_step": step}

    summary: dict[str, Any] = {
        "train": history, "eval": eval_history, "run_dir": str(run_dir),
        "checkpoint": str(ckpt.checkpoint_dir(run_dir) / str(cfg.train.steps)),
        "unigram_entropy": input_pipeline.corpus_unigram_entropy(cfg.data)
        if cfg.data.source == "synthetic" else None,
    }
    if sample and cfg.train.sample_tokens > 0:
        prompt = tokenizer.encode(cfg.train.sample_prompt)  # as the training data was:
        if cfg.data.add_bos or not prompt:  # with BOS when its documents had one
            prompt = [tokenizer.bos_id] + prompt
        with trainer.context():
            ids = greedy_generate(trainer.graphdef, state, prompt, cfg.train.sample_tokens,
                                  eos_id=tokenizer.eos_id, rows=batch_shards(trainer))
        summary["sample"] = cfg.train.sample_prompt + tokenizer.decode(ids)
    if is_main:
        print(f"final eval loss {eval_history[-1]['loss']:.4f} nats/token"
              + (f" (corpus unigram entropy {summary['unigram_entropy']:.4f})"
                 if summary["unigram_entropy"] else ""))
        print(f"checkpoint: {summary['checkpoint']}")
        if "sample" in summary:
            print(f"sample: {summary['sample']!r}")
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary

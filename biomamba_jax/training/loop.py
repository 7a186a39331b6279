"""The training run loop, shared by pretraining and fine-tuning: plan, initialise, train,
evaluate, checkpoint, resume, early-stop, export.

`Trainer` owns everything that does not depend on the data: the optimizer, the parallel
layout, orbax checkpoints with resume, metrics (JSONL + TensorBoard), the progress bar,
SIGTERM, non-finite steps, the evaluation hook and the final export. What a run trains on
is a *task* (see `Task`): the train batches (an iterator with `get_state`/`set_state`, so
a resumed run reads exactly the next batch), the evaluation sets, the step count and the
tokenizer files to ship with the export. `pretrain.PubmedTask` is pretraining,
`finetune.BioASQTask` supervised fine-tuning.

Pieces the loop is built from, importable on their own: `config` (run configs and
overrides), `step` (optimizer, loss, the one train step), `parallel` (pmap or Mesh
placement and the batch plan), `checkpointing` (orbax), `data.loader` (grain batches) and
`checkpoints` (init and export).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Protocol

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from biomamba_jax.training.checkpointing import Checkpointer, CheckpointWriteError
from biomamba_jax.model.config import ConfigError, MambaConfig
from biomamba_jax.checkpoints.convert import ConversionError
from biomamba_jax.training.parallel import BatchPlan, ParallelConfigError, initialize_distributed, make_layout
from biomamba_jax.checkpoints.export import export_hf
from biomamba_jax.files import write_text_atomic
from biomamba_jax.training.config import RunConfig, RunConfigError, to_yaml
from biomamba_jax.model.scan import resolve_scan_impl
from biomamba_jax.training.cross_entropy import resolve_loss_impl
from biomamba_jax.training.step import (TrainState, compiled_memory, lr_schedule, make_optimizer, model_flops_per_token,
                                        peak_flops_per_device)

__all__ = ["RunError", "USER_ERRORS", "Trainer", "Task", "MetricsLog", "use_compile_cache"]


class RunError(RuntimeError):
    """A run that cannot start or must stop, with the reason and what to do."""


# Bad input that the run scripts report in one line (exit 2) instead of a traceback.
USER_ERRORS = (RunError, RunConfigError, ParallelConfigError, ConfigError, ConversionError, CheckpointWriteError,
               FileNotFoundError)


def use_compile_cache(setting: str, log: Callable = print) -> Optional[Path]:
    """Point JAX's persistent compilation cache at `setting` (`run.compile_cache`) unless
    this process already has one; returns the directory in use (None: off)."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if setting == "off":
        return None
    if setting == "auto":
        cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        directory = Path(cache_home) / "biomamba-jax" / "xla"
    else:
        directory = Path(setting).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        # A read-only home must not stop a run: it only compiles as if there were no cache.
        log(f"warning: no compilation cache ({error}); set run.compile_cache to a writable dir or 'off'")
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory


# ------------------------------------------------------------------------ tasks
class Task(Protocol):
    """What a run trains and evaluates on. Attributes:

    summary_name   e.g. "pretrain" / "finetune": names the run in logs and the summary.
    seq_len        training positions per row (rows are `seq_len + 1` tokens).
    patience       stop after this many evaluations without a better `val_loss` and
                   export the best checkpoint; None trains to the last step.
    """

    summary_name: str
    seq_len: int
    patience: Optional[int]

    def prepare(self, model_config: MambaConfig, is_main: bool, log: Callable) -> None:
        """Build or check the data before anything is compiled; raise RunError if unusable."""

    def total_steps(self, plan: BatchPlan) -> int:
        """Optimizer steps of the whole run (the lr schedule spans them)."""

    def eval_every(self, plan: BatchPlan) -> int: ...

    def train_batches(self, plan: BatchPlan) -> Iterator[dict]:
        """Endless iterator of this process's rows {"tokens" (rows, L+1), "loss_mask" (rows, L),
        optional "attention_mask" and "segment_ids" (rows, L)}, with `get_state()` /
        `set_state(state)`."""

    def eval_sets(self, rows: int) -> dict[str, Callable[[], Iterable[dict]]]:
        """Evaluation sets by name, each a function giving batches of `rows` rows; "val"
        (if present) drives checkpoint retention and early stopping."""

    def export_files(self) -> dict[str, Path]:
        """Files to ship inside the final export (tokenizer files), by name."""

    def describe(self) -> dict:
        """Facts about the training data for the summary and the model card."""


def _initial_model(config: RunConfig) -> tuple[MambaConfig, dict]:
    """(model config, numpy-or-jax params) from `model.init`: random, a checkpoint or a run."""
    runtime = dict(dtype=config.model.dtype, scan_impl=config.model.scan_impl, remat=config.model.remat,
                   scan_layers=config.model.scan_layers, loss_impl=config.model.loss_impl,
                   loss_chunk_tokens=config.model.loss_chunk_tokens, reset_at_documents=config.model.reset_at_documents)
    if config.model.init == "random":
        overrides = {} if config.model.vocab_size is None else {"vocab_size": config.model.vocab_size}
        model_config = MambaConfig.preset(config.model.preset, **overrides, **runtime)
        from biomamba_jax.model.mamba import MambaLM
        from biomamba_jax.checkpoints.load import model_params

        model = MambaLM(model_config, rngs=nnx.Rngs(config.run.seed))
        return model_config, model_params(model)
    from biomamba_jax.checkpoints.runs import load_model

    model_config, params, _ = load_model(config.model.init, **runtime)
    return model_config, params


def _describe_loss(model_config: MambaConfig) -> str:
    """The loss as the plan prints it: "auto" resolved, the chunk size where it applies."""
    loss = resolve_loss_impl(model_config.loss_impl)
    return f"{loss} ({model_config.loss_chunk_tokens} tokens per chunk)" if loss == "chunked" else loss


def checkpoint_size_bytes(params) -> int:
    """Params plus the two fp32 AdamW moments."""
    return 3 * sum(int(np.prod(np.shape(x))) * 4 for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------ logging
def _keep_records_up_to(path: Path, last_step: int) -> None:
    """Cut metrics.jsonl back to the records of steps up to `last_step`, the step a run
    resumes from: a killed run may have logged steps after its last checkpoint, which the
    resumed run logs again. A torn last line (killed mid-write) goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and record.get("step", 0) <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(kept))


def _json_value(value):
    """Strict JSON has no NaN or infinity: a non-finite metric is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """JSONL and TensorBoard event files, written by process 0 only. A run that starts at
    `start_step` (a resume) first drops what an earlier process logged after that step."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        path = out_dir / "metrics.jsonl"
        _keep_records_up_to(path, start_step)
        self.jsonl = open(path, "a", buffering=1)
        self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **{k: _json_value(v) for k, v in values.items()}}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------ trainer
@dataclasses.dataclass
class Trainer:
    """Everything one run needs, built once by `Trainer.build` before any compile."""

    config: RunConfig
    task: object  # a Task
    model_config: MambaConfig
    plan: BatchPlan
    layout: object
    graphdef: object
    optimizer: object
    total_steps: int
    out_dir: Path
    is_main: bool
    log: Callable
    compile_cache: Optional[Path] = None  # JAX's persistent compilation cache (None: off)

    @classmethod
    def build(cls, config: RunConfig, task: "Task", log: Callable = print) -> "Trainer":
        """`task`: what the run trains on (`pretrain.PubmedTask`, `finetune.BioASQTask`)."""
        initialize_distributed(config.parallel.coordinator_address, config.parallel.num_processes,
                               config.parallel.process_id)
        is_main = jax.process_index() == 0
        quiet = log if is_main else (lambda *_: None)
        compile_cache = use_compile_cache(config.run.compile_cache, quiet)
        plan = BatchPlan.from_tokens(config.batch.global_batch_tokens, task.seq_len,
                                     config.batch.micro_batch_per_device, jax.device_count(),
                                     jax.process_count())
        model_config, params = _initial_model(config)
        task.prepare(model_config, is_main, quiet)
        total_steps = task.total_steps(plan)
        layout = make_layout(config.parallel.mode, plan, config.parallel.fsdp)
        from biomamba_jax.model.mamba import MambaLM

        graphdef = nnx.graphdef(nnx.eval_shape(lambda: MambaLM(model_config, rngs=nnx.Rngs(0))))
        trainer = cls(config, task, model_config, plan, layout, graphdef,
                      make_optimizer(config.optim, total_steps), total_steps, Path(config.run.out_dir),
                      is_main, quiet, compile_cache)
        trainer._initial_params = params
        return trainer

    # -------------------------------------------------------------- pieces
    def initial_state(self) -> TrainState:
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), self._initial_params)
        opt_state = jax.tree.map(np.asarray, self.optimizer.init(params))
        return TrainState(params, opt_state, np.int32(0))

    def print_plan(self, start_step: int, params) -> None:
        c, p = self.config, self.plan
        n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
        devices = jax.devices()
        self.log("\n".join([
            f"== {c.name}: plan ==",
            f"task         {self.task.summary_name}"
            + (f", early stopping after {self.task.patience} evaluations without a better val_loss"
               if self.task.patience else ""),
            f"devices      {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)), "
            f"parallel={self.layout.name}{' +fsdp' if c.parallel.fsdp else ''}",
            f"model        {n_params / 1e6:.1f}M params, d_model {self.model_config.d_model}, "
            f"{self.model_config.n_layer} layers, dtype {self.model_config.dtype}, "
            f"scan {resolve_scan_impl(self.model_config.scan, self.model_config.d_state)}, remat {self.model_config.remat}, "
            f"layers {'under one scan' if self.model_config.scan_layers else 'written out'}, "
            f"loss {_describe_loss(self.model_config)}, "
            f"packed documents {'run apart' if self.model_config.reset_at_documents else 'share the state'}",
            f"batch        {p.global_rows} x {p.seq_len} = {p.tokens_per_step:,} tokens/step; "
            f"micro-batch {p.micro_batch}/device x {p.num_devices} devices x {p.micro_steps} accumulation",
            f"steps        {start_step} -> {self.total_steps} "
            f"({(self.total_steps - start_step) * p.tokens_per_step:,} tokens)",
            f"checkpoints  every {c.run.checkpoint_every} steps, keep {c.run.keep_checkpoints} + best, "
            f"~{checkpoint_size_bytes(params) / 2**20:,.1f} MiB each, in {self.out_dir / 'checkpoints'}",
            f"compile      cache {self.compile_cache or 'off (run.compile_cache)'}",
        ]))

    def _report_memory(self, sizes: Optional[dict]) -> None:
        if sizes is None:
            self.log("memory       not reported by this backend")
            return
        gib = {key: value / 2**30 for key, value in sizes.items()}
        self.log(f"memory       {gib['total']:.2f} GiB per device for the compiled step (arguments "
                 f"{gib['arguments']:.2f}, temporaries {gib['temporaries']:.2f}, outputs not aliased "
                 f"{gib['outputs'] - gib['aliased']:.2f})")

    def evaluate(self, eval_step, params) -> dict:
        """Mean loss per target token of every evaluation set: `{name}_loss`, `{name}_perplexity`."""
        results = {}
        rows = self.plan.local_devices * self.plan.micro_batch
        for name, batches in self.task.eval_sets(rows).items():
            total, count = 0.0, 0.0
            for batch in batches():
                loss_sum, tokens = eval_step(params, batch)
                total, count = total + loss_sum, count + tokens
            if count:
                loss = total / count
                results.update({f"{name}_loss": loss, f"{name}_perplexity": math.exp(min(loss, 50.0)),
                                f"{name}_tokens": count})
        return results

    def _export(self, state, checkpointer: Checkpointer, meta: dict, summary: dict) -> None:
        """Write hf/ from the final state, or from the best checkpoint when early stopping."""
        params = None
        best_step = meta.get("best_step")
        if self.task.patience and best_step is not None:
            from biomamba_jax.checkpoints.runs import restore_params

            params, _ = restore_params(self.out_dir, best_step)
            summary["exported_step"] = best_step
        elif self.is_main:
            params = jax.tree.map(np.asarray, self.layout.gather_state(state).params)
            summary["exported_step"] = summary["final_step"]
        if self.is_main:
            export_hf(params, self.model_config, self.out_dir / "hf", overwrite=True,
                      extra_files=self.task.export_files())
            summary["hf_export"] = str(self.out_dir / "hf")

    # ---------------------------------------------------------------- loop
    def run(self, resume: bool = False, start_if_missing: bool = False) -> dict:
        """Train to the end (or `run.stop_at`). `resume` continues from the latest checkpoint in
        `run.out_dir` and fails when there is none, unless `start_if_missing` (a job that may
        or may not have run before)."""
        c = self.config
        total_steps = self.total_steps
        checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=c.run.keep_checkpoints)
        latest = checkpointer.latest_step()
        if latest is not None and not resume:
            checkpointer.close()
            raise RunError(f"{self.out_dir} already holds checkpoints (latest step {latest}): "
                           "pass --resume to continue, or choose another run.out_dir")
        if resume and latest is None and not start_if_missing:
            checkpointer.close()
            raise RunError(f"--resume: no checkpoint in {checkpointer.directory}. Check run.out_dir, or pass "
                           "--resume-or-start to start a fresh run there when none exists")
        finished = self._finished_summary(latest)
        if resume and finished is not None:
            checkpointer.close()
            self.log(f"{self.out_dir} already finished at step {finished['final_step']}: nothing to resume "
                     f"(raise run.steps to train further); its summary.json is unchanged")
            return finished
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(c))
            (self.out_dir / "model_config.json").write_text(json.dumps(self.model_config.to_dict(), indent=2))
        host_state = self.initial_state()
        train_iter = self.task.train_batches(self.plan)
        meta = {"skipped_steps": 0}
        start = 0
        if resume and latest is not None:
            restored = checkpointer.restore(self.layout.abstract_checkpoint(host_state))
            state = self.layout.from_checkpoint(restored.state)
            train_iter.set_state(restored.data_state)
            meta, start = restored.meta, restored.step
            self.log(f"resumed from step {start} in {checkpointer.directory}")
        else:
            if resume:
                self.log(f"--resume-or-start: no checkpoint in {checkpointer.directory}, starting fresh")
            state = self.layout.place_state(host_state)
        self.print_plan(start, host_state.params)

        # Compiled ahead of the loop on its first batch, so the plan can say how much device
        # memory the step needs before it runs (and a step that cannot fit fails here).
        first_batch = self.layout.place_batch(next(train_iter))
        train_step = self.layout.compile_train_step(self.graphdef, self.optimizer).lower(state, first_batch).compile()
        self._report_memory(compiled_memory(train_step))
        eval_step = self.layout.compile_eval_step(self.graphdef)
        schedule = lr_schedule(c.optim.peak_lr, c.optim.warmup_steps, total_steps, c.optim.final_lr_fraction)
        eval_every = self.task.eval_every(self.plan)
        flops_per_token = model_flops_per_token(self.model_config)
        peak = peak_flops_per_device(jax.devices()[0])
        metrics_log = MetricsLog(self.out_dir, self.is_main, start)
        stop = _StopRequest()
        summary = {"task": self.task.summary_name, "start_step": start, "stopped_by": None}
        consecutive_nonfinite, last_eval, losses, pending_skips = 0, {}, [], []

        def save(step, val_loss=None):
            checkpointer.save(step, self.layout.checkpoint_view(state), train_iter.get_state(), meta, val_loss)

        bar = tqdm(total=total_steps, initial=start, disable=not self.is_main, dynamic_ncols=True, unit="step")
        window_start, window_tokens = time.perf_counter(), 0
        profiler = None
        if c.run.profile_steps > 0 and self.is_main:
            from biomamba_jax.training.profiling import StepProfiler

            # From the third step: the first compiles, the second may still warm up.
            profiler = StepProfiler(str(self.out_dir / "profile"), start + 3, c.run.profile_steps)
        step = start
        try:
            while step < total_steps:
                if profiler:
                    profiler.before(step + 1, state)
                batch = first_batch if first_batch is not None else self.layout.place_batch(next(train_iter))
                first_batch = None
                state, metrics = train_step(state, batch)
                step += 1
                checkpointer.raise_if_failed()
                if profiler and (profile := profiler.after(step, state)) is not None:
                    with bar.external_write_mode():  # log lines above the progress bar
                        self._report_profile(profile)
                window_tokens += self.plan.tokens_per_step
                # Kept on device until the next log line, so steps are not synchronised.
                pending_skips.append(metrics["skipped"])
                if step % c.run.log_every == 0 or step == total_steps or step == start + 1:
                    values = self.layout.metrics(metrics)
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / elapsed
                    values.update(lr=float(schedule(step - 1)), tokens_per_s=tokens_per_s)
                    if peak:
                        values["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
                    values.pop("skipped")
                    for skipped in (int(np.asarray(s).reshape(-1)[0]) for s in pending_skips):
                        meta["skipped_steps"] = meta.get("skipped_steps", 0) + skipped
                        consecutive_nonfinite = consecutive_nonfinite + 1 if skipped else 0
                    pending_skips.clear()
                    values["skipped_steps"] = meta["skipped_steps"]
                    metrics_log.write(step, values)
                    losses.append((step, values["loss"]))
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                    tok_s=f"{tokens_per_s:,.0f}",
                                    **({"mfu": f"{values['mfu']:.1%}"} if peak else {}))
                    window_start, window_tokens = time.perf_counter(), 0
                    if consecutive_nonfinite >= c.run.max_consecutive_nonfinite:
                        raise RunError(
                            f"{consecutive_nonfinite} consecutive steps had a non-finite loss or "
                            f"gradient (up to step {step}); stopping. The last good checkpoint is intact in "
                            f"{checkpointer.directory}: lower optim.peak_lr or check the data, then --resume"
                        )
                bar.update(1)
                val_loss = None
                if step % eval_every == 0 or step == total_steps:
                    last_eval = self.evaluate(eval_step, state.params)
                    if last_eval:
                        metrics_log.write(step, last_eval)
                        bar.write(f"step {step}: " + ", ".join(
                            f"{k} {v:.4f}" for k, v in last_eval.items() if k.endswith("_loss")))
                    val_loss = last_eval.get("val_loss")
                    if val_loss is not None:
                        self._track_best(step, val_loss, meta, stop)
                if step == c.run.stop_at and not stop.signal_name:
                    stop.signal_name = f"run.stop_at={c.run.stop_at}"
                if step % c.run.checkpoint_every == 0 or step == total_steps or stop.signal_name \
                        or val_loss is not None and self.task.patience:
                    # Only a new best carries its val_loss to the checkpointer: orbax then keeps the
                    # very step `best_step` names (its own choice among equal losses may differ, and
                    # the export restores `best_step`).
                    save(step, val_loss if meta.get("best_step") == step else None)
                if stop.signal_name:
                    summary["stopped_by"] = stop.signal_name
                    if not stop.signal_name.startswith("early stopping"):
                        self.log(f"\n{stop.signal_name}: saved step {step}; resume with --resume")
                    break
        except BaseException:
            checkpointer.close(raise_errors=False)
            raise
        finally:
            if profiler:
                profiler.close()
            bar.close()
            metrics_log.close()
            stop.restore()

        summary.update(final_step=step, total_steps=total_steps, losses=losses, eval=last_eval,
                       skipped_steps=meta.get("skipped_steps", 0), best_step=meta.get("best_step"),
                       best_val_loss=meta.get("best_val_loss"), data=self.task.describe())
        try:
            finished = step == total_steps or str(summary["stopped_by"]).startswith("early stopping")
            checkpointer.wait()
            if finished and c.run.export_hf:
                self._export(state, checkpointer, meta, summary)
        finally:
            checkpointer.close()
        if self.is_main:
            write_text_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2))
            first, last = (losses[0][1], losses[-1][1]) if losses else (float("nan"),) * 2
            self.log(f"== done: step {step}/{total_steps}, loss {first:.4f} -> {last:.4f}"
                     + (f", val_loss {last_eval['val_loss']:.4f}" if "val_loss" in last_eval else "")
                     + (f", best val_loss {meta['best_val_loss']:.4f} at step {meta['best_step']}"
                        if self.task.patience and meta.get("best_step") is not None else "")
                     + f", skipped {summary['skipped_steps']}; outputs in {self.out_dir} ==")
        return summary

    def _finished_summary(self, latest: Optional[int]) -> Optional[dict]:
        """The summary of a run that ended here (its last step, or early stopping), else None."""
        path = self.out_dir / "summary.json"
        if latest is None or not path.is_file():
            return None
        summary = json.loads(path.read_text())
        ended = summary.get("final_step") == latest and (
            latest >= self.total_steps or str(summary.get("stopped_by")).startswith("early stopping"))
        return summary if ended else None

    def _report_profile(self, profile: dict) -> None:
        """Write profile.json (via a temporary name) and log where the steps' time went."""
        path = self.out_dir / "profile.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(profile, indent=2))
        tmp.replace(path)
        busy = profile["device_busy"]
        busy = f"device busy {busy:.1%}" if busy is not None else "no device trace (CPU: op times overlap)"
        self.log(f"profile of steps {profile['first_step']}-{profile['first_step'] + profile['steps'] - 1}: "
                 f"{profile['wall_ms_per_step']} ms per step, {busy}; "
                 + ", ".join(f"{k} {v} ms" for k, v in profile["categories"].items()) + f" ({path})")
        for op in profile["ops"][:10]:
            self.log(f"  {op['ms_per_call']:9.3f} ms  {op['category']:12s} {op['name'][:90]}")

    def _track_best(self, step: int, val_loss: float, meta: dict, stop: _StopRequest) -> None:
        """Remember the best validation loss; ask for a stop when patience has run out."""
        if meta.get("best_val_loss") is None or val_loss < meta["best_val_loss"]:
            meta.update(best_val_loss=float(val_loss), best_step=step, evals_since_best=0)
            return
        meta["evals_since_best"] = meta.get("evals_since_best", 0) + 1
        patience = self.task.patience
        if patience and meta["evals_since_best"] >= patience and not stop.signal_name:
            stop.signal_name = (f"early stopping: val_loss has not improved for {patience} evaluations "
                                f"(best {meta['best_val_loss']:.4f} at step {meta['best_step']})")
            self.log(f"\n{stop.signal_name}")

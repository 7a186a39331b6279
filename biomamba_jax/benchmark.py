"""Timed workloads on random weights and tokens: the whole training step, prefill, greedy
decode, and one layer's selective scan; and `scripts/pretrain.py`'s own loop around the same
step. `scripts/benchmark.py` is their command line.

The training step is the library's own (`training.step.make_train_step`: AdamW with the
weight-decay mask, clipping, the loss over all targets) with the optimizer and the model's
run-time settings of a run preset, so what is timed is what `scripts/pretrain.py` runs.

Each timing is the median of `repeats` calls after `warmup` calls, each ended by
`block_until_ready`. Memory: the compiled executable's own footprint (XLA's analysis of
arguments, outputs and temporaries) and the process-wide peak from `memory_stats()`.
Compile time is `compile_s` = `lower_s` (tracing and lowering to StableHLO; Pallas Mosaic
GPU kernels are built to GPU code here) + `xla_compile_s` (XLA's own compilation).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from biomamba_jax.checkpoints.load import model_params
from biomamba_jax.model.config import MambaConfig
from biomamba_jax.model.generate import generate
from biomamba_jax.model.mamba import MambaLM
from biomamba_jax.model.scan import resolve_scan_impl, selective_scan
from biomamba_jax.training.config import RunConfig
from biomamba_jax.training.cross_entropy import resolve_loss_impl
from biomamba_jax.training.profiling import profile_ops
from biomamba_jax.training.step import TrainState, compiled_memory, make_optimizer, make_train_step

__all__ = ["model_for", "time_train", "time_pretrain_loop", "time_torch_train", "time_prefill", "time_decode", "time_scan", "TORCH_IMPLS"]

TORCH_IMPLS = ("mamba_ssm", "transformers")

GiB = 2**30


def _timed(fn: Callable, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn(), after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _compile(jitted, *args) -> tuple[object, dict]:
    """The compiled executable and its compile time (in two parts: see the module
    docstring) and footprint, for a result row."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    row = {"compile_s": round(end - start, 1), "lower_s": round(lowered_at - start, 1),
           "xla_compile_s": round(end - lowered_at, 1)}
    sizes = compiled_memory(compiled)
    if sizes is not None:
        row["exe_GiB"] = round(sizes["total"] / GiB, 2)
    return compiled, row


def _with_profile(row: dict, fn: Callable, top: int) -> dict:
    """With `top` > 0, the row gains the `top` ops by device time of 3 traced calls of fn()."""
    if top > 0:
        row["profile"] = profile_ops(fn, calls=3, top=top)
    return row


def _process_peak_gib() -> Optional[float]:
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / GiB, 2) if "peak_bytes_in_use" in stats else None


def _random_tokens(seed: int, shape: tuple, vocab_size: int) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab_size - 8)


def _packed_segment_ids(seed: int, shape: tuple, document_length: int = 256) -> jax.Array:
    """Segment ids (..., L) of rows packed with documents of `document_length` tokens on
    average (PubMed abstracts: about 8 to a 2048-token row), split at random places."""
    length = shape[-1]
    cuts = max(1, length // document_length) - 1
    starts = jax.random.uniform(jax.random.PRNGKey(seed), shape) < cuts / length
    return 1 + jnp.cumsum(starts.at[..., 0].set(False), axis=-1, dtype=jnp.int32)


def model_for(config: RunConfig, size: Optional[str] = None) -> MambaConfig:
    """The model a run config trains (`model.preset` unless `size` names another), random init."""
    overrides = {} if config.model.vocab_size is None else {"vocab_size": config.model.vocab_size}
    return MambaConfig.preset(size or config.model.preset, dtype=config.model.dtype, scan_impl=config.model.scan_impl,
                              remat=config.model.remat, scan_layers=config.model.scan_layers,
                              loss_impl=config.model.loss_impl, loss_chunk_tokens=config.model.loss_chunk_tokens,
                              reset_at_documents=config.model.reset_at_documents, **overrides)


def _describe(model_config: MambaConfig) -> dict:
    return {"d_model": model_config.d_model, "layers": model_config.n_layer, "dtype": model_config.dtype,
            "scan_impl": str(resolve_scan_impl(model_config.scan, model_config.d_state)), "remat": model_config.remat,
            "scan_layers": model_config.scan_layers, "loss_impl": resolve_loss_impl(model_config.loss_impl),
            "reset_at_documents": model_config.reset_at_documents}


def time_train(config: RunConfig, model_config: MambaConfig, batch: int, length: int, *, warmup: int = 2,
               repeats: int = 5, profile: int = 0) -> dict:
    """Tokens per second of the library's training step on one device, one micro-batch, on
    rows packed as pretraining packs them (their segment ids are used where the model's
    `reset_at_documents` is on)."""
    model = MambaLM(model_config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), model_params(model)
    optimizer = make_optimizer(config.optim, total_steps=max(config.run.steps, warmup + repeats + 1))
    state = TrainState(params, optimizer.init(params), jnp.int32(0))
    step = jax.jit(make_train_step(graphdef, optimizer), donate_argnums=(0,))
    # One micro-batch: the leading axis is the step's gradient-accumulation axis.
    batch_arrays = {"tokens": _random_tokens(0, (1, batch, length + 1), model_config.vocab_size)}
    if model_config.reset_at_documents:
        batch_arrays["segment_ids"] = _packed_segment_ids(1, (1, batch, length))
    compiled, row = _compile(step, state, batch_arrays)
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], batch_arrays)
        return metrics["loss"]

    times = _timed(run, warmup, repeats)
    median = statistics.median(times)
    row = {"workload": "train", "batch": batch, "length": length, **_describe(model_config),
           "params_M": round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1),
           "step_s": round(median, 4), "tokens_per_s": round(batch * length / median),
           "times_s": [round(t, 4) for t in times], **row, "peak_GiB": _process_peak_gib(), "loss": float(run())}
    return _with_profile(row, run, profile)


def time_pretrain_loop(config: RunConfig, size: Optional[str], batch: int, length: int, *, steps: int = 30,
                       log_every: int = 5) -> dict:
    """Tokens per second per device of the pretraining run loop itself (`training.pretrain`:
    data loading, the non-finite guard, metrics, the progress bar) around the step that
    `time_train` times, with one `batch` x `length` micro-batch per device and step.

    The run trains the model that `model_for(config, size)` describes, from a random init,
    for `steps` steps on a synthetic corpus it prepares through the real pipeline (byte-level tokens), in a
    temporary folder, without the compilation cache, checkpoints between, or the export.
    The result is the median of the loop's own logged windows of `log_every` steps after
    the first two windows (the first holds the compilation)."""
    from biomamba_jax.data.tokenizer import OFFLINE_TOKENIZER
    from biomamba_jax.training.pretrain import pretrain

    if steps < 4 * log_every:
        raise ValueError(f"the loop needs at least {4 * log_every} steps for two timed windows of "
                         f"{log_every}; got {steps}")
    devices = jax.device_count()
    with tempfile.TemporaryDirectory(prefix="biomamba-loop-") as work:
        work = Path(work)
        run_config = dataclasses.replace(
            config,
            model=dataclasses.replace(config.model, init="random", preset=size or config.model.preset),
            data=dataclasses.replace(config.data, dir=str(work / "data"), seq_len=length, synthetic_files=2,
                                     synthetic_docs_per_file=200, val_fraction=0.05, tokenizer=OFFLINE_TOKENIZER),
            batch=dataclasses.replace(config.batch, global_batch_tokens=batch * length * devices,
                                      micro_batch_per_device=batch),
            run=dataclasses.replace(config.run, out_dir=str(work / "run"), steps=steps, stop_at=None,
                                    log_every=log_every, eval_every=steps, eval_batches=1, checkpoint_every=steps,
                                    export_hf=False, profile_steps=0, compile_cache="off"))
        pretrain(run_config, log=lambda *_: None)
        records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] / devices for r in records
               if "tokens_per_s" in r and r["step"] > 2 * log_every and r["step"] % log_every == 0]
    return {"workload": "loop", "batch": batch, "length": length, **_describe(model_for(config, size)),
            "devices": devices, "steps": steps, "tokens_per_s": round(statistics.median(windows)),
            "windows_tokens_per_s": [round(w) for w in windows]}


def time_torch_train(config: RunConfig, model_config: MambaConfig, batch: int, length: int, *,
                     torch_impl: str = "mamba_ssm", warmup: int = 2, repeats: int = 5, device: Optional[str] = None,
                     seed: int = 0) -> dict:
    """The PyTorch reference's own training step on the same model and shapes: what our
    step's speed is compared with. mamba_ssm's `MambaLMHeadModel` (its CUDA kernels) or
    transformers' `MambaForCausalLM`, a random init, bf16 autocast when the model's dtype is
    bfloat16, AdamW fused on a GPU with the run's lr, betas, eps and weight decay (the same
    decay mask), clipping and the fp32 cross-entropy over every target: the same work as
    `time_train`, without its document resets, which mamba_ssm cannot do. Memory is
    PyTorch's peak allocation over the timed steps. Torch is imported here only."""
    import torch

    from biomamba_jax.fidelity import torch_adamw

    if torch_impl not in TORCH_IMPLS:
        raise ValueError(f"torch_impl={torch_impl!r}; choose one of {TORCH_IMPLS}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    torch.manual_seed(seed)
    if torch_impl == "mamba_ssm":
        from mamba_ssm.models.config_mamba import MambaConfig as MambaSsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        model = MambaLMHeadModel(MambaSsmConfig(**model_config.to_mamba_ssm_dict()), device=device)
    else:
        from transformers import MambaConfig as HfMambaConfig
        from transformers import MambaForCausalLM

        model = MambaForCausalLM(HfMambaConfig(**model_config.to_hf_dict())).to(device)
    model.train()
    optimizer = torch_adamw(model, config.optim, fused=on_gpu)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_config.vocab_size - 8, (batch, length + 1), generator=generator).to(device)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=model_config.dtype == "bfloat16")

    def step():
        with autocast:
            logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(warmup):
        step()
    synchronize()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = round(torch.cuda.max_memory_allocated() / GiB, 2) if on_gpu else None
    return {"workload": "train", "framework": torch_impl, "batch": batch, "length": length,
            "d_model": model_config.d_model, "layers": model_config.n_layer, "dtype": model_config.dtype,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "step_s": round(median, 4),
            "tokens_per_s": round(batch * length / median), "times_s": [round(t, 4) for t in times],
            "peak_GiB": peak, "loss": loss.item()}


def time_prefill(model_config: MambaConfig, length: int, *, batch: int = 1, warmup: int = 2,
                 repeats: int = 5, profile: int = 0) -> dict:
    """Tokens per second of a parallel prefill (the logits of the last position and the cache)."""
    graphdef, state = nnx.split(MambaLM(model_config, rngs=nnx.Rngs(0)))

    @jax.jit
    def prefill(state, ids):
        logits, cache = nnx.merge(graphdef, state).prefill(ids, last_logits_only=True)
        return logits[:, -1], cache

    ids = _random_tokens(2, (batch, length), model_config.vocab_size)
    compiled, row = _compile(prefill, state, ids)
    times = _timed(lambda: compiled(state, ids), warmup, repeats)
    median = statistics.median(times)
    row = {"workload": "prefill", "batch": batch, "length": length, **_describe(model_config),
           "s": round(median, 5), "tokens_per_s": round(batch * length / median), **row,
           "peak_GiB": _process_peak_gib()}
    return _with_profile(row, lambda: compiled(state, ids), profile)


def time_decode(model_config: MambaConfig, batch: int, *, prompt: int = 128, new_tokens: int = 128,
                warmup: int = 2, repeats: int = 5) -> dict:
    """Greedy `generate` as mamba_ssm's benchmark times it: the whole call, prefill included,
    over the new tokens."""
    model = MambaLM(model_config, rngs=nnx.Rngs(0))
    ids = _random_tokens(3, (batch, prompt), model_config.vocab_size)
    start = time.perf_counter()
    jax.block_until_ready(generate(model, ids, max_new_tokens=new_tokens, eos_token_id=None).tokens)
    first_s = time.perf_counter() - start
    times = _timed(lambda: generate(model, ids, max_new_tokens=new_tokens, eos_token_id=None).tokens,
                   max(warmup - 1, 0), repeats)
    median = statistics.median(times)
    return {"workload": "decode", "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
            **_describe(model_config), "s": round(median, 4), "ms_per_token": round(median / new_tokens * 1e3, 3),
            "tokens_per_s": round(batch * new_tokens / median), "compile_s": round(first_s, 1),
            "peak_GiB": _process_peak_gib()}


def scan_inputs(seed: int, batch: int, length: int, channels: int, d_state: int, dtype=jnp.bfloat16,
                initial_state: bool = False) -> dict:
    """`selective_scan`'s arguments as the model passes them: raw delta, D, gate and dt
    bias; activations in `dtype`, A, D, the bias and the optional start state in fp32."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 9)
    inputs = dict(
        u=jax.random.normal(keys[0], (batch, length, channels), dtype),
        delta=(jax.random.normal(keys[1], (batch, length, channels)) - 1.0).astype(dtype),
        A=-jnp.exp(jax.random.normal(keys[2], (channels, d_state)) * 0.5),
        B=jax.random.normal(keys[3], (batch, length, d_state), dtype),
        C=jax.random.normal(keys[4], (batch, length, d_state), dtype),
        D=jax.random.normal(keys[5], (channels,)),
        z=jax.random.normal(keys[6], (batch, length, channels), dtype),
        delta_bias=jax.random.normal(keys[7], (channels,)) * 0.3,
    )
    if initial_state:
        inputs["initial_state"] = jax.random.normal(keys[8], (batch, channels, d_state))
    return inputs


def time_scan(impl: str, batch: int, length: int, channels: int, d_state: int, *, backward: bool = True,
              warmup: int = 2, repeats: int = 10, profile: int = 0) -> dict:
    """Milliseconds of one layer's `selective_scan` (forward, or forward + backward), with
    the bias, softplus, D skip and gate as in the model."""
    inputs = scan_inputs(0, batch, length, channels, d_state)
    weights = jax.random.normal(jax.random.PRNGKey(1), (batch, length, channels))

    def loss(x):
        y = selective_scan(**x, delta_softplus=True, impl=impl)
        return jnp.sum(y.astype(jnp.float32) * weights)

    fn = jax.jit(jax.grad(loss) if backward else loss)
    compiled, row = _compile(fn, inputs)
    times = _timed(lambda: compiled(inputs), warmup, repeats)
    row = {"workload": "scan", "mode": "fwd+bwd" if backward else "fwd", "shape": [batch, length, channels, d_state],
           "scan_impl": str(resolve_scan_impl(impl, d_state)), "ms": round(statistics.median(times) * 1e3, 3),
           "times_ms": [round(t * 1e3, 3) for t in times], **row, "peak_GiB": _process_peak_gib()}
    return _with_profile(row, lambda: compiled(inputs), profile)


def summary_line(row: dict) -> str:
    """One readable line per result row."""
    what = {"train": lambda r: f"B={r['batch']} L={r['length']}: {r['tokens_per_s']:,} tokens/s",
            "loop": lambda r: f"B={r['batch']} L={r['length']}: {r['tokens_per_s']:,} tokens/s per device"
                              + (f", {r['loop_over_step']}x the bare step" if "loop_over_step" in r else ""),
            "prefill": lambda r: f"B={r['batch']} L={r['length']}: {r['tokens_per_s']:,} tokens/s",
            "decode": lambda r: f"B={r['batch']}: {r['ms_per_token']} ms/token, {r['tokens_per_s']:,} tokens/s",
            "scan": lambda r: f"{r['mode']} {'x'.join(map(str, r['shape']))}: {r['ms']} ms"}[row["workload"]](row)
    size = row.get("peak_GiB") if "framework" in row else row.get("exe_GiB")  # torch: its peak allocation
    memory = f", {size} GiB" if size is not None else ""
    compile_time = f", compile {row['compile_s']} s (lowering {row['lower_s']} s)" if "lower_s" in row else ""
    impl = row.get("framework") or row.get("scan_impl", "")
    return f"{row['workload']:8s} {what}{memory}{compile_time} ({impl})"


"""Does the JAX training path learn like the PyTorch reference?

Both frameworks start from one random Mamba init (exported with the project's own
converter), see the same token batches in the same order and train the pretraining recipe
for N steps: AdamW (the run config's betas, eps and weight decay with the project's decay
mask), the project's warmup + cosine lr schedule and global-norm clipping. The per-step
losses are then compared and plotted.

- JAX runs the library's own optimizer and train step (`training/step.py`), unchanged.
- PyTorch runs transformers' `MambaForCausalLM` (its pure-torch path runs anywhere, CPU
  included) or mamba_ssm's `MambaLMHeadModel` (CUDA kernels) with `torch.optim.AdamW`,
  parameter groups that mirror `weight_decay_mask`, a `LambdaLR` written from the schedule's
  definition (not from optax) and `clip_grad_norm_`, optionally under bf16 autocast.

In float32 on the CPU the two curves agree to ~2e-7 relative over 6-12 steps (measured;
the tests assert 1e-4, and that decaying the wrong parameters shows), so a gap in bf16 on a
GPU is the frameworks' numerics, not a recipe mismatch. Torch is
imported inside the torch functions only, so this module imports without it.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from biomamba_jax.checkpoints.export import export_hf, export_mamba_ssm
from biomamba_jax.checkpoints.load import model_from_params, model_params
from biomamba_jax.files import atomic_output
from biomamba_jax.model.config import MambaConfig
from biomamba_jax.model.mamba import MambaLM
from biomamba_jax.training.config import OptimSection
from biomamba_jax.training.step import DECAYED_MIXER_WEIGHTS, TrainState, make_optimizer, make_train_step

__all__ = ["TORCH_IMPLS", "random_start", "random_token_batches", "pubmed_token_batches", "jax_losses",
           "export_start", "resolve_torch_impl", "torch_decays", "torch_lr_factor", "torch_losses",
           "compare_curves", "plot_curves"]

TORCH_IMPLS = ("transformers", "mamba_ssm", "auto")
StepCallback = Callable[[int, dict], None]


# ------------------------------------------------------------------ the shared start
def random_start(size: str, seed: int = 0, **config_overrides) -> tuple[MambaConfig, dict]:
    """A `MambaConfig.preset(size)` (with overrides) and its randomly initialised params,
    the init both frameworks start from."""
    config = MambaConfig.preset(size, **config_overrides)
    return config, model_params(MambaLM(config, rngs=nnx.Rngs(seed)))


def random_token_batches(steps: int, batch: int, length: int, vocab_size: int, seed: int = 0,
                         distinct: Optional[int] = None) -> np.ndarray:
    """(steps, batch, length + 1) int32 tokens uniform in [0, vocab_size): inputs are
    `[:, :-1]` of a row and targets `[:, 1:]`, as the train step reads them.

    Uniform tokens cannot be learnt beyond their unigram entropy, so a curve of fresh
    batches flattens at once; `distinct` cycles through that many batches instead (1: the
    model memorises one batch and the loss keeps falling)."""
    drawn = np.random.default_rng(seed).integers(0, vocab_size, (distinct or steps, batch, length + 1),
                                                 dtype=np.int32)
    return drawn[np.arange(steps) % len(drawn)]


def pubmed_token_batches(data_dir, steps: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """(steps, batch, length + 1) tokens of a prepared PubMed dir's train split, in the
    order pretraining would read them with this seed. Segment ids are dropped: mamba_ssm
    carries its state across packed documents, and a JAX step given tokens alone does too."""
    from biomamba_jax.data.loader import make_lm_loader

    # Endless, as in pretraining: a run longer than an epoch goes on into the next one.
    loader = make_lm_loader(data_dir, "train", length, batch, seed=seed, process_index=0, process_count=1)
    return np.stack([np.asarray(arrays["tokens"], np.int32) for arrays in itertools.islice(loader, steps)])


# ------------------------------------------------------------------------------ JAX
def jax_losses(config: MambaConfig, params: dict, batches: np.ndarray, optim: OptimSection,
               on_step: Optional[StepCallback] = None) -> dict[str, list[float]]:
    """Train `len(batches)` steps with the library's optimizer and step (the schedule
    spans exactly those steps) from `params`; per-step `loss` and `grad_norm` (before the
    clip), each measured on the params before that step's update."""
    model = model_from_params(config, params)
    # A copy: the step donates its state, which would otherwise delete the caller's arrays.
    graphdef, start = nnx.graphdef(model), jax.tree.map(jnp.copy, model_params(model))
    optimizer = make_optimizer(optim, total_steps=len(batches))
    state = TrainState(start, optimizer.init(start), jnp.int32(0))
    step = jax.jit(make_train_step(graphdef, optimizer), donate_argnums=(0,))
    curves: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for index, tokens in enumerate(batches):
        # Leading axis of one: the step's gradient-accumulation (micro-batch) axis.
        state, metrics = step(state, {"tokens": jnp.asarray(tokens)[None]})
        if int(metrics["skipped"]):
            raise FloatingPointError(f"JAX step {index}: loss or gradients not finite")
        row = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
        for key, value in row.items():
            curves[key].append(value)
        if on_step:
            on_step(index, row)
    return curves


# ---------------------------------------------------------------------------- torch
def export_start(config: MambaConfig, params: dict, directory, torch_impl: str) -> Path:
    """Write the shared start for `torch_impl` with the project's exporter."""
    multiple = config.pad_vocab_size_multiple
    if torch_impl == "mamba_ssm" and config.vocab_size % multiple:
        # The mamba_ssm export pads the vocabulary, and the padded rows' logits would
        # enter the torch softmax only: the losses would differ by construction.
        raise ValueError(f"vocab_size={config.vocab_size} is not a multiple of {multiple}; mamba_ssm would pad it")
    writer = {"transformers": export_hf, "mamba_ssm": export_mamba_ssm}[torch_impl]
    return writer(params, config, directory, overwrite=True)


def resolve_torch_impl(torch_impl: str) -> str:
    """"auto" is mamba_ssm where it imports (its CUDA kernels: the reference to train
    against on a GPU), else transformers."""
    if torch_impl not in TORCH_IMPLS:
        raise ValueError(f"torch_impl={torch_impl!r}; choose one of {TORCH_IMPLS}")
    if torch_impl != "auto":
        return torch_impl
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return "transformers"
    return "mamba_ssm"


def torch_decays(name: str) -> bool:
    """Whether a torch parameter (transformers' or mamba_ssm's name) gets weight decay:
    the torch twin of `weight_decay_mask` (the mixers' projection and conv weights only,
    never A_log, D, biases, norms or embeddings), from the same set of module names."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in DECAYED_MIXER_WEIGHTS


def torch_lr_factor(step: int, optim: OptimSection, total_steps: int) -> float:
    """The lr of update `step` (0-based) over `peak_lr`, written from the schedule's
    definition rather than taken from optax, so a test can hold the two against each other:
    linear warmup from 0, then a cosine to `final_lr_fraction`. The warmup and decay
    lengths are clamped as `training.step.lr_schedule` clamps them."""
    warmup = max(0, min(optim.warmup_steps, total_steps - 1))
    decay_steps = max(total_steps, warmup + 1) - warmup
    if step < warmup:
        return step / warmup
    progress = min(step - warmup, decay_steps) / decay_steps
    return optim.final_lr_fraction + (1 - optim.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _load_torch_model(directory: Path, torch_impl: str, device: str):
    import torch

    if torch_impl == "transformers":
        from transformers import MambaForCausalLM

        return MambaForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaLMHeadModel.from_pretrained(str(directory), device=device, dtype=torch.float32)


def torch_losses(directory, batches: np.ndarray, optim: OptimSection, *, torch_impl: str = "transformers",
                 dtype: str = "float32", device: str = "cpu", decays: Callable[[str], bool] = torch_decays,
                 on_step: Optional[StepCallback] = None) -> dict[str, list[float]]:
    """The same recipe in PyTorch from the checkpoint `directory` (`export_start`): fp32
    weights, AdamW, a LambdaLR stepped after every update (so update k uses factor k, as
    optax's count does), `clip_grad_norm_` and the mean next-token cross-entropy over every
    target token, under bf16 autocast when `dtype` is "bfloat16". `decays(name)` picks the
    decayed parameters (a negative control can pass a wrong one)."""
    import torch

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; choose float32 or bfloat16")
    model = _load_torch_model(Path(directory), resolve_torch_impl(torch_impl), device)
    model.train()
    named = list(model.named_parameters())  # tied embeddings appear once
    groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": optim.weight_decay},
              {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=optim.peak_lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: torch_lr_factor(k, optim, len(batches)))
    curves: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for index, tokens in enumerate(batches):
        tokens = torch.as_tensor(np.asarray(tokens, np.int64), device=device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16"):
            logits = model(tokens[:, :-1]).logits
        vocab = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"torch step {index}: loss not finite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
        optimizer.step()
        schedule.step()
        row = {"loss": loss.item(), "grad_norm": grad_norm.item()}
        for key, value in row.items():
            curves[key].append(value)
        if on_step:
            on_step(index, row)
    return curves


# ----------------------------------------------------------------------- comparison
def compare_curves(reference: Sequence[float], candidate: Sequence[float], skip_steps: int = 0) -> dict:
    """Per-step absolute and relative differences of `candidate` from `reference` from
    step `skip_steps` on (early steps of a bf16 run can be skipped), and their summary.
    `tail_mean_*` average each curve's last tenth of steps: what a long, noisy bf16 run's
    verdict should rest on rather than one step's difference."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"curves of {reference.size} and {candidate.size} steps")
    abs_diff = np.abs(candidate - reference)[skip_steps:]
    rel_diff = abs_diff / np.maximum(np.abs(reference[skip_steps:]), 1e-12)
    if abs_diff.size == 0:
        raise ValueError(f"skip_steps={skip_steps} leaves none of {reference.size} steps")
    tail = max(1, reference.size // 10)
    return {"skip_steps": skip_steps, "steps_compared": int(abs_diff.size),
            "abs_diff": abs_diff.tolist(), "rel_diff": rel_diff.tolist(),
            "max_abs_diff": float(abs_diff.max()), "mean_abs_diff": float(abs_diff.mean()),
            "max_rel_diff": float(rel_diff.max()), "mean_rel_diff": float(rel_diff.mean()),
            "final_reference": float(reference[-1]), "final_candidate": float(candidate[-1]),
            "tail_steps": tail, "tail_mean_reference": float(reference[-tail:].mean()),
            "tail_mean_candidate": float(candidate[-tail:].mean())}


def plot_curves(curves: dict[str, Sequence[float]], path, title: str = "") -> Path:
    """Loss curves (one line per name, first = reference) above the others' differences
    from the first, written atomically as a PNG."""
    # A bare Figure, not pyplot: no display needed and no global backend switched under a
    # caller that uses matplotlib itself.
    from matplotlib.figure import Figure

    names = list(curves)
    reference = np.asarray(curves[names[0]], np.float64)
    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for name in names:
        top.plot(np.arange(len(curves[name])), curves[name], label=name, linewidth=1)
    for name in names[1:]:
        bottom.plot(np.arange(len(reference)), np.asarray(curves[name], np.float64) - reference,
                    label=f"{name} - {names[0]}", linewidth=1)
    bottom.axhline(0.0, color="grey", linewidth=0.5)
    top.set_ylabel("training loss")
    bottom.set_ylabel("difference")
    bottom.set_xlabel("step")
    top.legend()
    bottom.legend()
    if title:
        top.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as partial:
        fig.savefig(partial, format="png", dpi=120)
    return path


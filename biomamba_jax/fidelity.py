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

Beside the curves: `step_detail` (one step's logits and per-tensor gradients, each JAX scan
variant against mamba_ssm in fp32, next to mamba_ssm's own bf16) and `greedy_tokens` /
`prefix_agreement` / `divergence_gaps` (greedy decoding from the same weights, and how
close to a tie each first divergence was).

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

from biomamba_jax.checkpoints.convert import HF, MAMBA_SSM, torch_to_jax_params
from biomamba_jax.checkpoints.export import export_hf, export_mamba_ssm
from biomamba_jax.checkpoints.load import model_from_params, model_params
from biomamba_jax.files import atomic_output
from biomamba_jax.model.config import MambaConfig
from biomamba_jax.model.mamba import MambaLM
from biomamba_jax.training.config import OptimSection
from biomamba_jax.model.generate import generate
from biomamba_jax.training.step import (DECAYED_MIXER_WEIGHTS, TrainState, make_optimizer, make_train_step,
                                        token_loss_sums)

__all__ = ["TORCH_IMPLS", "random_start", "random_token_batches", "pubmed_token_batches", "jax_losses",
           "export_start", "resolve_torch_impl", "torch_decays", "torch_adamw", "torch_lr_factor", "torch_losses",
           "compare_curves", "plot_curves", "relative_distance", "jax_step", "torch_step", "step_detail",
           "jax_greedy", "torch_greedy", "prefix_agreement", "divergence_gaps"]

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
               on_step: Optional[StepCallback] = None) -> tuple[dict[str, list[float]], dict]:
    """Train `len(batches)` steps with the library's optimizer and step (the schedule
    spans exactly those steps) from `params`. Returns the per-step `loss` and `grad_norm`
    (before the clip), each measured on the params before that step's update, and the
    trained params (what the detailed step and the decoding comparison start from)."""
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
    return curves, state.params


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


def torch_adamw(model, optim: OptimSection, decays: Callable[[str], bool] = torch_decays, fused: bool = False):
    """torch's AdamW over `model` with the run's lr, betas, eps and weight decay, decayed
    only where `decays(name)` says, as the JAX optimizer's mask does."""
    import torch

    named = list(model.named_parameters())  # tied embeddings appear once
    groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": optim.weight_decay},
              {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.peak_lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused)


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


def _load_torch_model(directory: Path, torch_impl: str, device: str, weights_dtype: str = "float32"):
    import torch

    dtype = getattr(torch, weights_dtype)
    if torch_impl == "transformers":
        from transformers import MambaForCausalLM

        return MambaForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaLMHeadModel.from_pretrained(str(directory), device=device, dtype=dtype)


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; choose float32 or bfloat16")


def torch_losses(directory, batches: np.ndarray, optim: OptimSection, *, torch_impl: str = "transformers",
                 dtype: str = "float32", device: str = "cpu", decays: Callable[[str], bool] = torch_decays,
                 on_step: Optional[StepCallback] = None) -> dict[str, list[float]]:
    """The same recipe in PyTorch from the checkpoint `directory` (`export_start`): fp32
    weights, AdamW, a LambdaLR stepped after every update (so update k uses factor k, as
    optax's count does), `clip_grad_norm_` and the mean next-token cross-entropy over every
    target token, under bf16 autocast when `dtype` is "bfloat16". `decays(name)` picks the
    decayed parameters (a negative control can pass a wrong one)."""
    import torch

    _check_dtype(dtype)
    model = _load_torch_model(Path(directory), resolve_torch_impl(torch_impl), device)
    model.train()
    optimizer = torch_adamw(model, optim, decays)
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


# --------------------------------------------------------------- one step in detail
def relative_distance(candidate, reference) -> float:
    """||candidate - reference|| / ||reference||, accumulated in float64 a row at a time
    (a 1.4b logits tensor is gigabytes)."""
    candidate, reference = np.asarray(candidate), np.asarray(reference)
    if candidate.shape != reference.shape:
        raise ValueError(f"shapes {candidate.shape} and {reference.shape} differ")
    rows = candidate.reshape(candidate.shape[0] if candidate.ndim else 1, -1)
    reference_rows = reference.reshape(rows.shape)
    diff_sq = ref_sq = 0.0
    for got, want in zip(rows, reference_rows):
        want = want.astype(np.float64)
        diff_sq += float(np.sum((got.astype(np.float64) - want) ** 2))
        ref_sq += float(np.sum(want ** 2))
    return math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-30)


def _flat_tree(tree) -> dict[str, np.ndarray]:
    """{"layers.mixer.in_proj.kernel": array, ...}: one entry per JAX parameter (per-layer
    weights stay stacked, so an entry covers every layer)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float32) for path, leaf in leaves}


def jax_step(config: MambaConfig, params: dict, tokens: np.ndarray, matmul_precision: Optional[str] = None) -> dict:
    """One batch through the JAX model as the train step sees it: `logits` (B, L, V) as
    float32, the mean next-token `loss` and the `grads` of that loss per parameter.
    `matmul_precision="highest"` keeps float32 matmuls in float32 on GPUs, where XLA's
    default may use TF32."""
    model = model_from_params(config, params)
    graphdef, state = nnx.graphdef(model), model_params(model)
    tokens = jnp.asarray(tokens, jnp.int32)

    def mean_loss(p):
        loss_sum, count = token_loss_sums(graphdef, p, {"tokens": tokens})
        return loss_sum / count

    @jax.jit  # one program, one compilation: the loss's kernels serve the logits too
    def logits_loss_grads(p):
        return nnx.merge(graphdef, p)(tokens[:, :-1]), *jax.value_and_grad(mean_loss)(p)

    with jax.default_matmul_precision(matmul_precision):
        logits, loss, grads = logits_loss_grads(state)
    return {"logits": np.asarray(logits, np.float32), "loss": float(loss), "grads": _flat_tree(grads)}


def torch_step(directory, config: MambaConfig, tokens: np.ndarray, *, torch_impl: str = "transformers",
               dtype: str = "float32", device: str = "cpu") -> dict:
    """`jax_step` in PyTorch from the checkpoint `directory`: fp32 weights, bf16 autocast
    when `dtype` says so; the gradients are mapped onto JAX's parameter names by the
    conversion table the checkpoints use."""
    import torch

    _check_dtype(dtype)
    torch_impl = resolve_torch_impl(torch_impl)
    model = _load_torch_model(Path(directory), torch_impl, device)
    model.train()
    tokens = torch.as_tensor(np.asarray(tokens, np.int64), device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = model(tokens[:, :-1]).logits
    vocab = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {name: p.grad.float().cpu().numpy() for name, p in model.named_parameters()}
    fmt = MAMBA_SSM if torch_impl == "mamba_ssm" else HF
    return {"logits": logits.detach().float().cpu().numpy(), "loss": loss.item(),
            "grads": _flat_tree(torch_to_jax_params(grads, config, fmt))}


def step_detail(reference: dict, runs: dict[str, dict], baseline: str) -> dict:
    """Each run's logits and per-parameter gradients as relative distances from
    `reference` (mamba_ssm in fp32: the closest thing to exact arithmetic at hand), and,
    per parameter, that distance over the `baseline` run's (mamba_ssm's own bf16): a ratio
    near or under 1 means the run errs no more than the reference implementation does."""
    report = {}
    for name, run in runs.items():
        grads = {key: relative_distance(run["grads"][key], reference["grads"][key]) for key in reference["grads"]}
        report[name] = {"loss": run["loss"], "loss_diff": run["loss"] - reference["loss"],
                        "logits": relative_distance(run["logits"], reference["logits"]), "grads": grads}
    spread = report[baseline]
    for name, entry in report.items():
        ratios = {key: value / max(spread["grads"][key], 1e-30) for key, value in entry["grads"].items()}
        entry["logits_ratio"] = entry["logits"] / max(spread["logits"], 1e-30)
        entry["grads_ratio"] = ratios
        entry["grads_ratio_max"] = max(ratios.values())
        entry["grads_ratio_median"] = float(np.median(list(ratios.values())))
        entry["worst_grad"] = max(ratios, key=ratios.get)
    return report


# ------------------------------------------------------------------------- decoding
def jax_greedy(config: MambaConfig, params: dict, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """(B, new_tokens) greedy continuations of equal-length `prompts` (B, P) with the
    library's `generate` (prefill, then the recurrent step), never stopping at EOS."""
    output = generate(model_from_params(config, params), np.asarray(prompts, np.int32),
                      max_new_tokens=new_tokens, eos_token_id=None)
    return np.asarray(output.tokens)


def torch_greedy(directory, prompts: np.ndarray, new_tokens: int, *, torch_impl: str = "transformers",
                 dtype: str = "float32", device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch implementation's own greedy decoding of the same prompts, with weights
    in `dtype` (its usual inference setting): (B, new_tokens) tokens and the (B,
    new_tokens, V) float32 logits each token was picked from. mamba_ssm decodes with its
    step kernels under a CUDA graph on a GPU; transformers with its cache."""
    import torch

    _check_dtype(dtype)
    torch_impl = resolve_torch_impl(torch_impl)
    model = _load_torch_model(Path(directory), torch_impl, device, weights_dtype=dtype)
    model.eval()
    prompts = torch.as_tensor(np.asarray(prompts, np.int64), device=device)
    with torch.no_grad():
        if torch_impl == "mamba_ssm":
            out = model.generate(prompts, max_length=prompts.shape[1] + new_tokens, top_k=1,
                                 cg=torch.device(device).type == "cuda", return_dict_in_generate=True,
                                 output_scores=True)
        else:
            model.generation_config.eos_token_id = None  # never stop early: equal lengths
            model.generation_config.pad_token_id = 0
            # An explicit mask: inferred from pad_token_id, it would hide prompt tokens equal to it.
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                 do_sample=False, return_dict_in_generate=True, output_scores=True)
    tokens = out.sequences[:, prompts.shape[1]:].cpu().numpy()
    logits = torch.stack(list(out.scores), dim=1).float().cpu().numpy()
    return tokens, logits


def prefix_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Per row, how many leading tokens `candidate` shares with `reference` (after the
    first difference the two continue from different text, so later matches say
    nothing); `fraction` is their total over all tokens."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"token arrays of shapes {reference.shape} and {candidate.shape}")
    differs = reference != candidate
    prefix = np.where(differs.any(axis=1), differs.argmax(axis=1), reference.shape[1])
    return {"fraction": float(prefix.sum() / reference.size), "rows_identical": int((prefix == reference.shape[1]).sum()),
            "rows": int(reference.shape[0]), "prefix_lengths": prefix.tolist()}


def divergence_gaps(reference: np.ndarray, candidate: np.ndarray, reference_logits: np.ndarray) -> list[dict]:
    """At each row's first differing token: how far apart the reference's logits put its
    own pick and the candidate's, in absolute terms and in bf16 steps at that logit's
    magnitude (2^(e-7) for a logit in [2^e, 2^(e+1))). A gap of a step or two is a tie that
    bf16 rounding decides; a large gap would be a real disagreement."""
    gaps = []
    for row, length in enumerate(prefix_agreement(reference, candidate)["prefix_lengths"]):
        if length == reference.shape[1]:
            continue
        logits = reference_logits[row, length]
        picked, other = logits[reference[row, length]], logits[candidate[row, length]]
        bf16_step = 2.0 ** (math.floor(math.log2(max(abs(float(picked)), 1e-30))) - 7)
        gap = float(picked - other)
        gaps.append({"row": row, "step": int(length), "reference_token": int(reference[row, length]),
                     "candidate_token": int(candidate[row, length]), "logit": float(picked), "gap": gap,
                     "gap_in_bf16_steps": gap / bf16_step})
    return gaps


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
    if names[1:]:
        bottom.legend()
    if title:
        top.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as partial:
        fig.savefig(partial, format="png", dpi=120)
    return path


"""One table that maps PyTorch Mamba-1 tensors to the JAX parameter tree, in both directions.

Each `TensorRule` names a PyTorch key (in the transformers spelling; mamba_ssm differs
only in the embedding's name), the path of the matching leaf in the JAX tree, and the
layout change between them. Per-layer tensors ({i} in the key) are stacked along a
leading layer axis on the JAX side because the model scans over its layers.

Everything here is numpy: no torch, no model instance.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Mapping

import numpy as np

from biomamba_jax.model.config import MambaConfig

__all__ = [
    "Layout",
    "TensorRule",
    "CONVERSION_TABLE",
    "ConversionError",
    "torch_to_jax_params",
    "jax_to_torch_state",
    "expected_param_shapes",
]

HF = "hf"
MAMBA_SSM = "mamba_ssm"
FORMATS = (HF, MAMBA_SSM)


class ConversionError(ValueError):
    """A checkpoint that does not fit the model, with the tensor and the shapes named."""


class Layout(enum.Enum):
    """How a PyTorch tensor is laid out relative to its JAX leaf. Each is its own inverse."""

    SAME = "same"
    LINEAR = "linear"  # torch Linear (out, in)  <->  Flax kernel (in, out)
    CONV1D = "conv1d"  # torch depthwise Conv1d (E, 1, K)  <->  Flax Conv kernel (K, 1, E)

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self is Layout.LINEAR:
            return array.T
        if self is Layout.CONV1D:
            return array.transpose(2, 1, 0)
        return array


@dataclasses.dataclass(frozen=True)
class TensorRule:
    torch_key: str  # transformers spelling; "{i}" marks a per-layer tensor
    jax_path: tuple[str, ...]
    layout: Layout

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.torch_key

    def key_for(self, fmt: str, layer: int | None = None) -> str:
        key = self.torch_key.format(i=layer) if self.per_layer else self.torch_key
        if fmt == MAMBA_SSM:
            key = key.replace("backbone.embeddings.", "backbone.embedding.")
        return key


_MIXER = "backbone.layers.{i}.mixer."
CONVERSION_TABLE: tuple[TensorRule, ...] = (
    TensorRule("backbone.embeddings.weight", ("embedding", "embedding"), Layout.SAME),
    TensorRule("backbone.layers.{i}.norm.weight", ("layers", "norm", "weight"), Layout.SAME),
    TensorRule(_MIXER + "in_proj.weight", ("layers", "mixer", "in_proj", "kernel"), Layout.LINEAR),
    TensorRule(_MIXER + "in_proj.bias", ("layers", "mixer", "in_proj", "bias"), Layout.SAME),
    TensorRule(_MIXER + "conv1d.weight", ("layers", "mixer", "conv1d", "kernel"), Layout.CONV1D),
    TensorRule(_MIXER + "conv1d.bias", ("layers", "mixer", "conv1d", "bias"), Layout.SAME),
    TensorRule(_MIXER + "x_proj.weight", ("layers", "mixer", "x_proj", "kernel"), Layout.LINEAR),
    TensorRule(_MIXER + "dt_proj.weight", ("layers", "mixer", "dt_proj", "kernel"), Layout.LINEAR),
    TensorRule(_MIXER + "dt_proj.bias", ("layers", "mixer", "dt_proj", "bias"), Layout.SAME),
    TensorRule(_MIXER + "A_log", ("layers", "mixer", "A_log"), Layout.SAME),
    TensorRule(_MIXER + "D", ("layers", "mixer", "D"), Layout.SAME),
    TensorRule(_MIXER + "out_proj.weight", ("layers", "mixer", "out_proj", "kernel"), Layout.LINEAR),
    TensorRule(_MIXER + "out_proj.bias", ("layers", "mixer", "out_proj", "bias"), Layout.SAME),
    TensorRule("backbone.norm_f.weight", ("norm_f", "weight"), Layout.SAME),
    TensorRule("lm_head.weight", ("lm_head", "kernel"), Layout.LINEAR),
)
TIED_HEAD_KEY = "lm_head.weight"


def expected_param_shapes(config: MambaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes of every JAX leaf, by path, computed without allocating the model."""
    from flax import nnx  # local: keeps this module importable without building a model

    from biomamba_jax.model.mamba import MambaLM

    abstract = nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {tuple(str(p) for p in path): tuple(var.get_value().shape) for path, var in flat}


def _active_rules(config: MambaConfig, shapes) -> list[TensorRule]:
    return [rule for rule in CONVERSION_TABLE if rule.jax_path in shapes]


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def torch_to_jax_params(
    tensors: Mapping[str, np.ndarray], config: MambaConfig, fmt: str = HF
) -> dict:
    """PyTorch state dict (numpy arrays) -> nested dict matching `nnx.state(model, nnx.Param)`.

    Raises ConversionError for a missing or unexpected key and for any shape that does not
    match the config, naming the key and both shapes.
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    shapes = expected_param_shapes(config)
    rules = _active_rules(config, shapes)
    used: set[str] = set()
    params: dict = {}
    for rule in rules:
        layers = range(config.n_layer) if rule.per_layer else [None]
        want = shapes[rule.jax_path]
        # Checked per tensor, in the PyTorch layout, before any transpose or stack: one bad
        # layer must give this message, not a numpy error from np.stack or transpose.
        want_one = want[1:] if rule.per_layer else want
        want_torch = rule.layout.apply(np.broadcast_to(np.float32(0), want_one)).shape
        arrays = []
        for layer in layers:
            key = rule.key_for(fmt, layer)
            if key not in tensors:
                raise ConversionError(
                    f"checkpoint is missing tensor {key!r} (needed for {'.'.join(rule.jax_path)}); "
                    f"is it a {fmt} Mamba-1 checkpoint with {config.n_layer} layers?"
                )
            array = np.asarray(tensors[key])
            if tuple(array.shape) != tuple(want_torch):
                raise ConversionError(
                    f"tensor {key!r} has shape {tuple(array.shape)} but the config implies "
                    f"{tuple(want_torch)} (JAX {'.'.join(rule.jax_path)} {want}): "
                    "config.json and weights disagree"
                )
            used.add(key)
            arrays.append(rule.layout.apply(array))
        value = np.stack(arrays) if rule.per_layer else arrays[0]
        _set_path(params, rule.jax_path, value.astype(np.float32))
    unexpected = sorted(set(tensors) - used - ({TIED_HEAD_KEY} if config.tie_embeddings else set()))
    if unexpected:
        shown = unexpected[:5] + (["..."] if len(unexpected) > 5 else [])
        raise ConversionError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {shown}")
    return params


def jax_to_torch_state(params: Mapping, config: MambaConfig, fmt: str = HF) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_jax_params`: nested JAX params -> PyTorch-layout numpy arrays.

    For mamba_ssm the tied `lm_head.weight` is included (that format stores both keys);
    for transformers it is left out, since safetensors refuses shared tensors.
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    shapes = expected_param_shapes(config)
    tensors: dict[str, np.ndarray] = {}
    for rule in _active_rules(config, shapes):
        try:
            value = np.asarray(_get_path(params, rule.jax_path))
        except (KeyError, TypeError):
            raise ConversionError(
                f"parameters lack {'.'.join(rule.jax_path)} (shape {shapes[rule.jax_path]} "
                "expected from the config)"
            ) from None
        if tuple(value.shape) != shapes[rule.jax_path]:
            raise ConversionError(
                f"parameter {'.'.join(rule.jax_path)} has shape {tuple(value.shape)}, "
                f"config implies {shapes[rule.jax_path]}"
            )
        slices: Iterable = enumerate(value) if rule.per_layer else [(None, value)]
        for layer, array in slices:
            tensors[rule.key_for(fmt, layer)] = np.ascontiguousarray(rule.layout.apply(array))
    if fmt == MAMBA_SSM and config.tie_embeddings:
        tensors[TIED_HEAD_KEY] = tensors[CONVERSION_TABLE[0].key_for(MAMBA_SSM)]
    return tensors

"""Mamba-1 model configuration, presets, and readers/writers for both PyTorch config flavours.

One frozen dataclass describes the architecture (what a checkpoint fixes) plus four
run-time choices that do not change the weights: the compute dtype, the selective-scan
implementation, the remat policy and whether the layers run under a scan. Their defaults
here are the only ones in the project (run configs and benchmarks read them from here),
and they are the fast ones for training on a GPU; CPU work usually wants float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Union

from biomamba_jax.model.scan_options import DEFAULT_SCAN_IMPL, ScanImpl, parse_scan_impl

__all__ = ["MambaConfig", "PRESETS", "ConfigError"]


class ConfigError(ValueError):
    """A config that cannot describe a Mamba-1 model, with the field and the fix named."""


REMAT_POLICIES = ("none", "full", "dots", "scan")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50280  # rows of the embedding, already padded
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto" = ceil(d_model / 16)
    norm_eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 8
    # Initialisation of dt (used only by --init random).
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    initializer_range: float = 0.02
    # Token ids the tokenizer uses (GPT-NeoX: <|endoftext|> = 0 is both EOS and pad).
    eos_token_id: int = 0
    pad_token_id: int = 0
    # Run-time choices: they do not change the weights.
    dtype: str = "bfloat16"  # compute dtype; parameters, the SSM state and the residual stay fp32
    scan_impl: str = DEFAULT_SCAN_IMPL  # see scan_options: "auto", "pallas:fuse=delta", ...
    # What the backward pass recomputes: "scan" keeps the scan kernel's outputs and
    # recomputes the rest of each layer, so the kernel is not run twice; "full" recomputes
    # everything (least memory); "dots" keeps matmul outputs; "none" keeps all.
    remat: str = "scan"
    # Run the layers under one `lax.scan` (compile time independent of depth, less memory)
    # or written out one by one (no stacking copies of what the backward pass keeps: a
    # faster step, a slower compile).
    scan_layers: bool = False

    def __post_init__(self):
        if self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"MambaConfig.dtype={self.dtype!r}; choose one of {COMPUTE_DTYPES}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"MambaConfig.scan_layers must be true or false, got {self.scan_layers!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"MambaConfig.remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        try:
            scan = parse_scan_impl(self.scan_impl)
        except ValueError as e:
            raise ConfigError(f"MambaConfig.scan_impl: {e}") from None
        object.__setattr__(self, "_scan", scan)  # parsed once; not a field, so not in to_dict or ==

    @property
    def scan(self) -> ScanImpl:
        """`scan_impl`, parsed: the implementation and its checked options."""
        return self._scan

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "MambaConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "MambaConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------ native (our) format
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MambaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown MambaConfig field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**values)

    # ------------------------------------------------ transformers MambaConfig
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers' `MambaForCausalLM.from_pretrained` reads it."""
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "time_step_rank": self.dt_rank,
            "layer_norm_epsilon": self.norm_eps,
            "use_bias": self.proj_bias,
            "use_conv_bias": self.conv_bias,
            "hidden_act": "silu",
            "residual_in_fp32": True,
            "tie_word_embeddings": self.tie_embeddings,
            "time_step_min": self.dt_min,
            "time_step_max": self.dt_max,
            "time_step_floor": self.dt_init_floor,
            "time_step_scale": self.dt_scale,
            "time_step_init_scheme": "random",
            "initializer_range": self.initializer_range,
            "rescale_prenorm_residual": False,
            "use_cache": True,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> "MambaConfig":
        for required in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if required not in hf:
                raise ConfigError(f"HF Mamba config.json lacks {required!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r}: Mamba-1 here supports only 'silu'")
        d_model, expand = hf["hidden_size"], hf.get("expand", 2)
        if "intermediate_size" in hf and hf["intermediate_size"] != expand * d_model:
            raise ConfigError(
                f"intermediate_size={hf['intermediate_size']} disagrees with "
                f"expand*hidden_size={expand * d_model}"
            )
        return cls(
            d_model=d_model,
            n_layer=hf["num_hidden_layers"],
            vocab_size=hf["vocab_size"],
            d_state=hf.get("state_size", 16),
            d_conv=hf.get("conv_kernel", 4),
            expand=expand,
            dt_rank=hf.get("time_step_rank", "auto"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            conv_bias=hf.get("use_conv_bias", True),
            proj_bias=hf.get("use_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dt_min=hf.get("time_step_min", 1e-3),
            dt_max=hf.get("time_step_max", 1e-1),
            dt_init_floor=hf.get("time_step_floor", 1e-4),
            dt_scale=hf.get("time_step_scale", 1.0),
            initializer_range=hf.get("initializer_range", 0.02),
            eos_token_id=_first_id(hf.get("eos_token_id"), 0),
            pad_token_id=_first_id(hf.get("pad_token_id"), 0),
            **runtime,
        )

    # ------------------------------------------------- original mamba_ssm format
    def to_mamba_ssm_dict(self) -> dict[str, Any]:
        """config.json for mamba_ssm's `MambaLMHeadModel.from_pretrained`.

        Only keys that both mamba_ssm 1.x and 2.x accept: its loader passes every key to a
        dataclass, so an unknown key breaks loading.
        """
        # ssm_cfg holds the mixer's arguments; without the non-default ones a model with,
        # say, d_state 8 would be read back (and built by mamba_ssm) with d_state 16.
        mixer = {"d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
                 "dt_rank": self.dt_rank, "conv_bias": self.conv_bias, "bias": self.proj_bias}
        defaults = {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": math.ceil(self.d_model / 16),
                    "conv_bias": True, "bias": False}
        return {
            "d_model": self.d_model,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {k: v for k, v in mixer.items() if v != defaults[k]},
            "rms_norm": True,
            "residual_in_fp32": True,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
        }

    @classmethod
    def from_mamba_ssm_dict(cls, ms: dict[str, Any], vocab_rows: int | None = None, **runtime) -> "MambaConfig":
        """Read mamba_ssm's config.json. The vocabulary is sized from the embedding tensor
        (`vocab_rows`) because `vocab_size` there is the unpadded count."""
        for required in ("d_model", "n_layer"):
            if required not in ms:
                raise ConfigError(f"mamba_ssm config.json lacks {required!r}")
        ssm_cfg = dict(ms.get("ssm_cfg") or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        if layer != "Mamba1":
            raise ConfigError(f"ssm_cfg.layer={layer!r}: only Mamba1 checkpoints are supported")
        if ms.get("attn_layer_idx"):
            raise ConfigError("attn_layer_idx is set: hybrid attention checkpoints are not supported")
        if ms.get("d_intermediate", 0):
            raise ConfigError("d_intermediate > 0 (MLP layers) is not a Mamba-1 checkpoint")
        if not ms.get("rms_norm", True):
            raise ConfigError("rms_norm=false (LayerNorm) checkpoints are not supported")
        supported_ssm = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias",
                         "dt_min", "dt_max", "dt_init_floor", "dt_scale", "dt_init", "use_fast_path"}
        unsupported = sorted(set(ssm_cfg) - supported_ssm)
        if unsupported:
            raise ConfigError(f"unsupported ssm_cfg key(s) {unsupported} in mamba_ssm config.json")
        multiple = ms.get("pad_vocab_size_multiple", 8)
        vocab = vocab_rows if vocab_rows is not None else _round_up(ms.get("vocab_size", 50277), multiple)
        return cls(
            d_model=ms["d_model"],
            n_layer=ms["n_layer"],
            vocab_size=vocab,
            d_state=ssm_cfg.get("d_state", 16),
            d_conv=ssm_cfg.get("d_conv", 4),
            expand=ssm_cfg.get("expand", 2),
            dt_rank=ssm_cfg.get("dt_rank", "auto"),
            conv_bias=ssm_cfg.get("conv_bias", True),
            proj_bias=ssm_cfg.get("bias", False),
            tie_embeddings=ms.get("tie_embeddings", True),
            pad_vocab_size_multiple=multiple,
            dt_min=ssm_cfg.get("dt_min", 1e-3),
            dt_max=ssm_cfg.get("dt_max", 1e-1),
            dt_init_floor=ssm_cfg.get("dt_init_floor", 1e-4),
            dt_scale=ssm_cfg.get("dt_scale", 1.0),
            **runtime,
        )

    # ------------------------------------------------------------------ files
    @classmethod
    def from_json_file(cls, path: Union[str, Path], **runtime) -> "MambaConfig":
        """Read any of the three config.json flavours, recognised by their keys."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        if "hidden_size" in values:
            return cls.from_hf_dict(values, **runtime)
        if "d_model" in values and "n_layer" in values and "d_state" not in values:
            return cls.from_mamba_ssm_dict(values, **runtime)
        return cls.from_dict({**values, **runtime})


def _round_up(value: int, multiple: int) -> int:
    return value if multiple <= 1 else -(-value // multiple) * multiple


def _first_id(value, default: int) -> int:
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


# Sizes from the state-spaces/mamba-* checkpoints (vocab 50277 padded to 50280).
PRESETS: dict[str, dict[str, Any]] = {
    "mamba-130m": dict(d_model=768, n_layer=24),
    "mamba-370m": dict(d_model=1024, n_layer=48),
    "mamba-790m": dict(d_model=1536, n_layer=48),
    "mamba-1.4b": dict(d_model=2048, n_layer=48),
    "mamba-2.8b": dict(d_model=2560, n_layer=64),
    # Small enough for CPU tests; keeps the real vocabulary so the real tokenizer works.
    "tiny": dict(d_model=64, n_layer=2, d_state=8),
}

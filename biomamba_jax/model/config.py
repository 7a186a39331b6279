"""Mamba-1 model configuration, presets, and readers/writers for both PyTorch config flavours.

One frozen dataclass describes the architecture (what a checkpoint fixes) plus run-time
choices that do not change the weights: the compute dtype, the selective-scan
implementation, the remat policy, whether the layers run under a scan, how the loss
applies the LM head and whether packed documents restart the state. Their defaults
here are the only ones in the project (run configs and benchmarks read them from here),
and they are the fast ones for training on a GPU; CPU work usually wants float32.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Union

from biomamba_jax.model.scan_options import DEFAULT_SCAN_IMPL, ScanImpl, parse_scan_impl

__all__ = ["MambaConfig", "PRESETS", "ConfigError", "ConfigWarning", "config_format", "HF_FORMAT",
           "MAMBA_SSM_FORMAT", "NATIVE_FORMAT"]


class ConfigError(ValueError):
    """A config that cannot describe a Mamba-1 model, with the field and the fix named."""


REMAT_POLICIES = ("none", "full", "dots", "scan")
LOSS_IMPLS = ("auto", "chunked", "tokamax", "full")
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
    # How the training and eval loss applies the LM head (training/cross_entropy.py).
    # "chunked" runs over chunks of `loss_chunk_tokens` tokens and never holds the whole
    # (tokens, vocab) logits (the largest buffers of a step otherwise); "tokamax" is
    # tokamax's fused kernel (an optional install; loss masks must be 0/1); "full" is the
    # plain softmax over all logits at once; "auto" is tokamax where it is installed with
    # a kernel for the device, else chunked. They agree to rounding; in bf16 "full" also
    # rounds the logits to bf16 before its fp32 softmax, where the others keep them fp32.
    loss_impl: str = "auto"
    loss_chunk_tokens: int = 1024
    # Given segment ids (rows of packed documents, as in pretraining), run each document as
    # if alone: the conv window and the SSM state restart at every document's first token.
    # False carries them across documents, as mamba_ssm's Mamba-1 pretraining did.
    reset_at_documents: bool = True

    def __post_init__(self):
        if self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank",
                     "pad_vocab_size_multiple", "loss_chunk_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"MambaConfig.{name} must be a token id (an integer >= 0), got {value!r}")
        for name in ("norm_eps", "dt_min", "dt_max", "dt_init_floor", "dt_scale", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"MambaConfig.{name} must be a number, got {value!r}")
        for name in ("conv_bias", "proj_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MambaConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"MambaConfig.dtype={self.dtype!r}; choose one of {COMPUTE_DTYPES}")
        for name in ("scan_layers", "reset_at_documents"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MambaConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"MambaConfig.remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ConfigError(f"MambaConfig.loss_impl={self.loss_impl!r}; choose one of {LOSS_IMPLS}")
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
    def from_dict(cls, values: dict[str, Any], *, source: str | None = None, **overrides) -> "MambaConfig":
        """From `to_dict` output, with `overrides` on top; `source` (the file it came
        from) prefixes errors."""
        values = {**_require_object(values, source or "a MambaConfig dict"), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                (f"{source}: " if source else "")
                + f"unknown MambaConfig field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return _build(cls, source, **values) if source else cls(**values)

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
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "HF Mamba config.json", **runtime) -> "MambaConfig":
        """Read transformers' config.json. `source` names the file in errors and warnings.

        Every field read is type-checked; a key transformers' MambaConfig does not know
        is reported by a `ConfigWarning` (transformers ignores it too), naming the field it
        was probably meant to set when that field is absent and so takes its default.
        """
        hf = _require_object(hf, source)
        _check_model_type(hf, source)
        _warn_unknown_keys(hf, HF_MAMBA_KEYS | set(HF_CARRIED_MAMBA_SSM_KEYS), _HF_FIELDS, source,
                           "transformers' MambaConfig")
        values = _read_fields(hf, _HF_FIELDS, source)
        hidden_act = _read_field(hf, "hidden_act", "str", "silu", source)
        if hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act={hidden_act!r}: Mamba-1 here supports only 'silu'")
        intermediate = _read_field(hf, "intermediate_size", "int", None, source)
        if intermediate is not None and intermediate != values["expand"] * values["d_model"]:
            raise ConfigError(
                f"{source}: intermediate_size={intermediate} disagrees with "
                f"expand*hidden_size={values['expand'] * values['d_model']}"
            )
        _warn_carried_mamba_ssm_keys(hf, source)
        return _build(cls, source, **values, **runtime)

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
    def from_mamba_ssm_dict(cls, ms: dict[str, Any], vocab_rows: int | None = None, *,
                            source: str = "mamba_ssm config.json", **runtime) -> "MambaConfig":
        """Read mamba_ssm's config.json. The vocabulary is sized from the embedding tensor
        (`vocab_rows`) because `vocab_size` there is the unpadded count. Fields are
        type-checked and unknown keys warned about, as in `from_hf_dict`."""
        ms = _require_object(ms, source)
        _warn_unknown_keys(ms, MAMBA_SSM_KEYS, _MAMBA_SSM_FIELDS, source, "mamba_ssm's MambaConfig")
        top = _read_fields(ms, _MAMBA_SSM_FIELDS, source)
        ssm_cfg = _read_field(ms, "ssm_cfg", "object", None, source) or {}
        where = f"{source} ssm_cfg"
        layer = _read_field(ssm_cfg, "layer", "str", "Mamba1", where)
        if layer != "Mamba1":
            raise ConfigError(f"{where}: layer={layer!r}: only Mamba1 checkpoints are supported")
        if _read_field(ms, "attn_layer_idx", "list", None, source):
            raise ConfigError(f"{source}: attn_layer_idx is set: hybrid attention checkpoints are not supported")
        if _read_field(ms, "d_intermediate", "int", 0, source):
            raise ConfigError(f"{source}: d_intermediate > 0 (MLP layers) is not a Mamba-1 checkpoint")
        if not _read_field(ms, "rms_norm", "bool", True, source):
            raise ConfigError(f"{source}: rms_norm=false (LayerNorm) checkpoints are not supported")
        for key in ("residual_in_fp32", "fused_add_norm"):
            _read_field(ms, key, "bool", True, source)
        unsupported = sorted(set(ssm_cfg) - set(_SSM_CFG_FIELDS) - {"layer"})
        if unsupported:
            raise ConfigError(f"{where}: unsupported key(s) {unsupported}; a Mamba-1 ssm_cfg takes "
                              f"{sorted(_SSM_CFG_FIELDS)}")
        mixer = _read_fields(ssm_cfg, _SSM_CFG_FIELDS, where)
        vocab_size = top.pop("vocab_size")
        multiple = top["pad_vocab_size_multiple"]
        vocab = vocab_rows if vocab_rows is not None else _round_up(vocab_size, multiple)
        return _build(cls, source, vocab_size=vocab, **top, **mixer, **runtime)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_json_file(cls, path: Union[str, Path], **runtime) -> "MambaConfig":
        """Read any of the three config.json flavours, recognised by their keys
        (`config_format`)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        fmt = config_format(values, path)
        if fmt == HF_FORMAT:
            return cls.from_hf_dict(values, source=str(path), **runtime)
        if fmt == MAMBA_SSM_FORMAT:
            return cls.from_mamba_ssm_dict(values, source=str(path), **runtime)
        return cls.from_dict(values, source=str(path), **runtime)


# ------------------------------------------------------------- config.json flavours
HF_FORMAT, MAMBA_SSM_FORMAT, NATIVE_FORMAT = "hf", "mamba_ssm", "native"
_REQUIRED = object()  # a field without a default: the file must set it

def _field(name: str, kind: str) -> tuple[str, str, Any]:
    """A config-file key read into MambaConfig field `name`, defaulting to that field's own default."""
    return name, kind, MambaConfig.__dataclass_fields__[name].default


# transformers key -> (MambaConfig field, kind, default when the key is absent).
_HF_FIELDS: dict[str, tuple[str, str, Any]] = {
    "hidden_size": ("d_model", "int", _REQUIRED),
    "num_hidden_layers": ("n_layer", "int", _REQUIRED),
    "vocab_size": ("vocab_size", "int", _REQUIRED),
    "state_size": _field("d_state", "int"),
    "conv_kernel": _field("d_conv", "int"),
    "expand": _field("expand", "int"),
    "time_step_rank": _field("dt_rank", "int|auto"),
    "layer_norm_epsilon": _field("norm_eps", "number"),
    "use_conv_bias": _field("conv_bias", "bool"),
    "use_bias": _field("proj_bias", "bool"),
    "tie_word_embeddings": _field("tie_embeddings", "bool"),
    "time_step_min": _field("dt_min", "number"),
    "time_step_max": _field("dt_max", "number"),
    "time_step_floor": _field("dt_init_floor", "number"),
    "time_step_scale": _field("dt_scale", "number"),
    "initializer_range": _field("initializer_range", "number"),
    "eos_token_id": _field("eos_token_id", "token id"),
    "pad_token_id": _field("pad_token_id", "token id"),
}
# mamba_ssm top-level key -> (MambaConfig field, kind, default); the rest are checked in
# from_mamba_ssm_dict (they select features this project does not support).
_MAMBA_SSM_FIELDS: dict[str, tuple[str, str, Any]] = {
    "d_model": ("d_model", "int", _REQUIRED),
    "n_layer": ("n_layer", "int", _REQUIRED),
    "vocab_size": ("vocab_size", "int", 50277),  # unpadded, as mamba_ssm writes it
    "pad_vocab_size_multiple": _field("pad_vocab_size_multiple", "int"),
    "tie_embeddings": _field("tie_embeddings", "bool"),
}
# ssm_cfg key -> (MambaConfig field, kind, default); the mixer's arguments for Mamba1.
_SSM_CFG_FIELDS: dict[str, tuple[str, str, Any]] = {
    "d_state": _field("d_state", "int"),
    "d_conv": _field("d_conv", "int"),
    "expand": _field("expand", "int"),
    "dt_rank": _field("dt_rank", "int|auto"),
    "conv_bias": _field("conv_bias", "bool"),
    "bias": _field("proj_bias", "bool"),
    "dt_min": _field("dt_min", "number"),
    "dt_max": _field("dt_max", "number"),
    "dt_init_floor": _field("dt_init_floor", "number"),
    "dt_scale": _field("dt_scale", "number"),
    "dt_init": (None, "str", "random"),  # initialisation only; read for its type
    "use_fast_path": (None, "bool", True),  # a CUDA kernel switch, no effect on the weights
}

# Every key transformers' MambaConfig knows: its own __init__ arguments and what
# PretrainedConfig reads or writes for every model, in transformers 4.x and 5.x
# (tests/test_bad_inputs.py checks this against the installed transformers). Kept here
# so that reading a config does not import transformers.
HF_MAMBA_KEYS = frozenset({
    # MambaConfig.__init__
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon",
    "pad_token_id", "bos_token_id", "eos_token_id", "expand", "conv_kernel", "use_bias",
    "use_conv_bias", "hidden_act", "initializer_range", "residual_in_fp32", "time_step_rank",
    "time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme",
    "time_step_floor", "rescale_prenorm_residual", "use_cache", "use_mambapy",
    "use_associative_scan", "tie_word_embeddings", "intermediate_size",
    # PretrainedConfig
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
    "output_hidden_states", "output_attentions", "return_dict", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "quantization_config", "gradient_checkpointing", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
# mamba_ssm keys that the state-spaces/mamba-*-hf config.json files carry beside the
# transformers ones; transformers ignores them. Those with a transformers twin must agree.
HF_CARRIED_MAMBA_SSM_KEYS = {"d_model": "hidden_size", "n_layer": "num_hidden_layers",
                             "d_inner": "intermediate_size", "fused_add_norm": None, "rms_norm": None,
                             "ssm_cfg": None, "pad_vocab_size_multiple": None}
# Every key mamba_ssm's MambaConfig dataclass takes (its loader refuses any other).
MAMBA_SSM_KEYS = frozenset({"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                            "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                            "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"})
_HF_MARKERS = {"hidden_size", "num_hidden_layers"}
_MAMBA_SSM_MARKERS = {"d_model", "n_layer", "ssm_cfg"}


class ConfigWarning(UserWarning):
    """A config.json key that nothing reads; a misspelt field would otherwise take its default unseen."""


def config_format(values: Any, source: Union[str, Path], *, native: bool = True) -> str:
    """Which config.json flavour `values` is, from its keys: HF_FORMAT, MAMBA_SSM_FORMAT
    or (when `native`) NATIVE_FORMAT. Anything else is a ConfigError listing what each
    flavour needs.

    transformers' keys win: the state-spaces/mamba-*-hf files carry mamba_ssm keys too.
    A native file (MambaConfig.to_dict) has mixer fields such as d_state at the top level,
    where mamba_ssm keeps them in ssm_cfg.
    """
    values = _require_object(values, source)
    keys = set(values)
    _check_model_type(values, source)
    if values.get("model_type") == "mamba" or keys & _HF_MARKERS:
        return HF_FORMAT
    native_only = {f.name for f in dataclasses.fields(MambaConfig)} - MAMBA_SSM_KEYS
    if native and keys & native_only and "ssm_cfg" not in keys:
        return NATIVE_FORMAT
    if keys & _MAMBA_SSM_MARKERS:
        return MAMBA_SSM_FORMAT
    shown = sorted(keys)[:8] + (["..."] if len(keys) > 8 else [])
    raise ConfigError(
        f"{source} is neither a transformers Mamba config (needs hidden_size, num_hidden_layers, vocab_size) "
        f"nor a mamba_ssm one (needs d_model, n_layer)"
        + (" nor a biomamba_config.json (MambaConfig fields)" if native else "") + f"; its keys are {shown}"
    )


def _require_object(values: Any, source) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{source} holds a JSON {_json_kind(values)}, not an object; "
                          "a Mamba config.json is an object of settings ({\"hidden_size\": ..., ...})")
    return values


def _check_model_type(values: dict, source) -> None:
    model_type = values.get("model_type")
    if model_type is not None and model_type != "mamba":
        raise ConfigError(f"{source}: model_type {model_type!r} is not a Mamba-1 model; this project reads "
                          "transformers configs with model_type 'mamba'")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


_KIND_WORDS = {"int": "an integer", "int|auto": 'an integer or "auto"', "number": "a number",
               "bool": "true or false", "str": "a string", "object": "an object", "list": "an array",
               "token id": "an integer token id (or a list of them, or null)"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_field(values: dict, key: str, kind: str, default: Any, source) -> Any:
    """values[key], checked to be of `kind`; `default` when absent."""
    if key not in values:
        if default is _REQUIRED:
            raise ConfigError(f"{source} lacks {key!r} ({_KIND_WORDS[kind]})")
        return default
    value = values[key]
    if kind == "int":
        ok = _is_int(value)
    elif kind == "int|auto":
        ok = _is_int(value) or value == "auto"
    elif kind == "number":
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "object":
        ok = value is None or isinstance(value, dict)
    elif kind == "list":
        ok = value is None or isinstance(value, list)
    elif kind == "token id":
        ok = value is None or _is_int(value) or (isinstance(value, list) and all(map(_is_int, value)))
    else:  # pragma: no cover - a kind missing above is a bug here
        raise AssertionError(kind)
    if not ok:
        raise ConfigError(f"{source}: {key!r} must be {_KIND_WORDS[kind]}, got {value!r} "
                          f"(a JSON {_json_kind(value)}){_type_fix(value, kind)}")
    if kind == "number":
        return float(value)
    if kind == "token id":
        return _first_id(value, 0)
    return value


def _type_fix(value: Any, kind: str) -> str:
    """The edit that makes a wrongly typed value right, when it is obvious."""
    if isinstance(value, str):
        text = value.strip()
        if kind == "bool" and text.lower() in ("true", "false"):
            return f"; write {text.lower()} without quotes"
        try:
            number = float(text)
        except ValueError:
            return ""
        if kind in ("int", "int|auto", "token id") and number.is_integer():
            return f"; write {int(number)} without quotes"
        if kind == "number":
            return f"; write {text} without quotes"
    if isinstance(value, bool) and kind != "bool":
        return "; true and false are not numbers here"
    if isinstance(value, float) and kind in ("int", "int|auto") and value.is_integer():
        return f"; write {int(value)}"
    return ""


def _read_fields(values: dict, table: dict[str, tuple[str, str, Any]], source) -> dict[str, Any]:
    """{MambaConfig field: checked value} for the entries of `table` that map to a field;
    the others are type-checked only."""
    read = {key: _read_field(values, key, kind, default, source) for key, (_, kind, default) in table.items()}
    return {field: read[key] for key, (field, _, _) in table.items() if field is not None}


def _warn_unknown_keys(values: dict, known: set, table: dict[str, tuple[str, str, Any]], source,
                       reader: str) -> None:
    """A ConfigWarning per key `reader` does not know, naming the field it probably meant to
    set when that field is absent from the file and so takes its default."""
    for key in sorted(set(values) - set(known)):
        if key.startswith("_"):  # transformers' own bookkeeping (_name_or_path, ...)
            continue
        message = f"{source}: unknown key {key!r} ignored ({reader} does not know it)"
        guess = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        if key in _SSM_CFG_FIELDS and "ssm_cfg" in known:
            message += f"; in mamba_ssm's format {key!r} belongs inside ssm_cfg"
        elif guess:
            meant = guess[0]
            message += f"; did you mean {meant!r}?"
            if meant not in values and meant in table and table[meant][2] is not _REQUIRED:
                message += f" It is not set, so it takes its default {table[meant][2]!r}"
        warnings.warn(message, ConfigWarning, stacklevel=4)


def _warn_carried_mamba_ssm_keys(hf: dict, source) -> None:
    """The mamba_ssm twins in a transformers config.json are ignored by transformers: a
    disagreement means one of the two was edited, and only the transformers key counts."""
    for key, twin in HF_CARRIED_MAMBA_SSM_KEYS.items():
        if twin and key in hf and twin in hf and hf[key] != hf[twin]:
            warnings.warn(f"{source}: {key}={hf[key]!r} disagrees with {twin}={hf[twin]!r}; transformers reads "
                          f"{twin} and ignores {key}, and so does this loader", ConfigWarning, stacklevel=4)


def _build(cls, source, **fields) -> "MambaConfig":
    try:
        return cls(**fields)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


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

"""biomamba-jax: Mamba-1 state-space language models for biomedical text, in JAX/Flax."""

from .config import ConfigError, MambaConfig
from .generate import GenerationOutput, generate, left_pad
from .model import MambaBlock, MambaCache, MambaLM, MambaMixer
from .pretrained import export_hf, export_mamba_ssm, from_pretrained, load_checkpoint, save_pretrained
from .scan import selective_scan, selective_state_update

__all__ = [
    "ConfigError", "MambaConfig", "GenerationOutput", "generate", "left_pad", "MambaBlock",
    "MambaCache", "MambaLM", "MambaMixer", "export_hf", "export_mamba_ssm", "from_pretrained",
    "load_checkpoint", "save_pretrained", "selective_scan", "selective_state_update",
]

"""biomamba-jax: Mamba-1 state-space language models for biomedical text, in JAX/Flax."""

from biomamba_jax.model.config import ConfigError, MambaConfig
from biomamba_jax.model.generate import GenerationOutput, generate, left_pad
from biomamba_jax.model.mamba import MambaBlock, MambaCache, MambaLM, MambaMixer
from biomamba_jax.checkpoints.load import from_pretrained, load_checkpoint
from biomamba_jax.checkpoints.export import export_hf, export_mamba_ssm, save_pretrained
from biomamba_jax.model.scan import selective_scan, selective_state_update

__all__ = [
    "ConfigError", "MambaConfig", "GenerationOutput", "generate", "left_pad", "MambaBlock",
    "MambaCache", "MambaLM", "MambaMixer", "export_hf", "export_mamba_ssm", "from_pretrained",
    "load_checkpoint", "save_pretrained", "selective_scan", "selective_state_update",
]

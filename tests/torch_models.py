"""Randomly initialised PyTorch Mamba models saved in the real formats, for parity tests."""
import torch
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

TINY_HF = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2,
               conv_kernel=4, pad_token_id=0, eos_token_id=0, bos_token_id=0)
MAMBA_130M_HF = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16,
                     expand=2, conv_kernel=4)


def random_hf_mamba(seed: int = 0, **config) -> MambaForCausalLM:
    """A MambaForCausalLM with explicit, realistically scaled random weights, whose A_log,
    D, dt bias, conv bias and norms are far from their defaults, so a converter that mixes
    them up cannot pass by luck.

    The matrices are drawn here rather than left to transformers' initialiser, whose scale
    differs between versions; at its 5.x scale (embedding entries in the hundreds) a
    24-layer fp32 forward is itself 8e-5 away from float64.
    """
    torch.manual_seed(seed)
    model = MambaForCausalLM(HFMambaConfig(**{**TINY_HF, **config})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("A_log", ".D", "dt_proj.bias", "conv1d.bias", "norm")):
                param.add_(torch.randn_like(param) * 0.3)
            elif name.endswith("conv1d.weight"):
                param.copy_(torch.randn_like(param) * 0.3)
            elif param.ndim == 2:
                param.copy_(torch.randn_like(param) * 0.02 * (5 if "dt_proj" in name else 1))
    return model

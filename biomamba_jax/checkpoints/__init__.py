"""Checkpoints: the one conversion table between JAX and PyTorch layouts, loading any
Mamba-1 checkpoint or run folder, saving and exporting, and the model card."""

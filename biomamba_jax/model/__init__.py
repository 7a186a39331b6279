"""The Mamba-1 model: its config, the Flax module, the selective scan and its
implementations, and generation (greedy, sampling, beam search)."""

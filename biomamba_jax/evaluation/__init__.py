"""Evaluation: the paper's metrics and the official BioASQ factoid metrics, the scorers
(JAX and transformers/torch), and the report."""

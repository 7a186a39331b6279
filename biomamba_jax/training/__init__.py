"""Training: run configs, the optimizer and the one train step, parallel layouts,
checkpoints with exact resume, the run loop, and the pretraining and fine-tuning tasks."""

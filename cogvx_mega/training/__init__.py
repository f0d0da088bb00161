"""Training: the step, the loop, checkpoints and metrics."""

"""Training: the step, the loop, checkpoints and metrics."""


class TrainingDiverged(RuntimeError):
    """Too many steps in a row were skipped (training.max_skipped_steps); the last good weights are saved."""

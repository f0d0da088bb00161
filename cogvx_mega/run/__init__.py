"""Running the stack end to end: a training run's setup (`training`), shared by the CLI, the demo and the API."""

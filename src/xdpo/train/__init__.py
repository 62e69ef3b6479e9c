"""Training: the recipe (`loop.train`), deterministic batches, checkpoints, metrics."""

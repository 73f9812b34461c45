"""Class-incremental learning tooling built on the SD-LoRA tuner: task splits, training, metrics."""

"""Continual LoRAX training, its baselines and metrics."""

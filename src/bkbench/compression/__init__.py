"""Flags that change a model's weights and numbers: quantization, pruning, mixed precision."""

"""hetero: DeepSeek-class MoE models on one GPU plus CPU RAM."""

__version__ = "0.1.0"

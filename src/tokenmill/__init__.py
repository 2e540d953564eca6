"""tokenmill: pretrain dense decoder-only language models, from a laptop CPU to multi-node GPUs."""

__version__ = "0.1.0"

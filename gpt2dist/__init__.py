"""gpt2dist: fine-tune GPT-2 on one CPU or many GPUs with PyTorch Lightning."""

from gpt2dist.data import TokenBlockDataModule
from gpt2dist.model import GPT2Module

__all__ = ["GPT2Module", "TokenBlockDataModule"]
__version__ = "0.1.0"

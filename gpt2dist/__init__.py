"""gpt2dist: fine-tune GPT-2 on one CPU or many GPUs with PyTorch Lightning."""

__all__ = ["GPT2Module", "TokenBlockDataModule"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, not with the package: `gpt2dist` (gpt2dist/__main__.py) installs its SIGUSR1
    # handler before torch and Lightning load (seconds), and importing the package must not load them first.
    if name == "GPT2Module":
        from gpt2dist.model import GPT2Module

        return GPT2Module
    if name == "TokenBlockDataModule":
        from gpt2dist.data import TokenBlockDataModule

        return TokenBlockDataModule
    raise AttributeError(f"module 'gpt2dist' has no attribute {name!r}")

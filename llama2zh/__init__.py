"""llama2zh: tiny bilingual (English + Chinese) Llama-2 models, trained in PyTorch, run in C."""

__version__ = "0.1.0"

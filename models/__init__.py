"""The plain model: a Llama-style decoder with no parallelism inside it."""
from .llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]

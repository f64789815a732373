"""The built-in mechanisms; importing this package registers them."""

from attention_zoo.mechanisms import lavo, sdpa, softmax

__all__ = ["lavo", "sdpa", "softmax"]

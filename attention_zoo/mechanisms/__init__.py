"""The built-in mechanisms; importing this package registers them."""

from attention_zoo.mechanisms import lavo, linear, sdpa, softmax

__all__ = ["lavo", "linear", "sdpa", "softmax"]

"""The built-in mechanisms; importing this package registers them."""

from attention_zoo.mechanisms import lavo, local, s4d, sdpa, softmax

__all__ = ["lavo", "local", "s4d", "sdpa", "softmax"]

"""The built-in mechanisms; importing this package registers them."""

from attention_zoo.mechanisms import cosformer, lavo, linear, performer, sdpa, softmax

__all__ = ["cosformer", "lavo", "linear", "performer", "sdpa", "softmax"]

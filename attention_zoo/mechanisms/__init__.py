"""The built-in mechanisms; importing this package registers them."""

from attention_zoo.mechanisms import cosformer, lavo, linear, lln, performer, sdpa, softmax

__all__ = ["cosformer", "lavo", "linear", "lln", "performer", "sdpa", "softmax"]

"""The built-in mechanisms; importing this package registers them."""

from attention_zoo.mechanisms import (
    cosformer,
    lara,
    lavo,
    linear,
    lln,
    performer,
    ra,
    sdpa,
    softmax,
)

__all__ = ["cosformer", "lara", "lavo", "linear", "lln", "performer", "ra", "sdpa", "softmax"]

"""The built-in mechanisms, one module each; importing this package registers them."""

from attention_zoo.mechanisms import (
    abc,
    cosformer,
    lara,
    lavo,
    linear,
    lln,
    local,
    longshort,
    nystrom,
    performer,
    probsparse,
    ra,
    s4d,
    sdpa,
    softmax,
)

__all__ = [
    "abc",
    "cosformer",
    "lara",
    "lavo",
    "linear",
    "lln",
    "local",
    "longshort",
    "nystrom",
    "performer",
    "probsparse",
    "ra",
    "s4d",
    "sdpa",
    "softmax",
]

"""The built-in mechanisms; importing this package registers them."""

from attention_zoo.mechanisms import abc, lavo, local, longshort, nystrom, probsparse, s4d, sdpa, softmax

__all__ = ["abc", "lavo", "local", "longshort", "nystrom", "probsparse", "s4d", "sdpa", "softmax"]

"""LAVO: the fast PyTorch path (``attention``) and the definition-by-loops reference (``naive``)."""

from attention_zoo.mechanisms.lavo.attention import LAVOAttention, LAVOConfig, LAVOState
from attention_zoo.mechanisms.lavo.naive import lavo_naive

__all__ = ["LAVOAttention", "LAVOConfig", "LAVOState", "lavo_naive"]

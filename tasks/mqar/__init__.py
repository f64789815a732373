"""Multi-query associative recall (Zoology's MQAR): a small causal LM recalls the values bound to
keys earlier in its context; every layer's self attention is a zoo member."""

from tasks.mqar.task import MQARConfig, MQARTask

__all__ = ["MQARConfig", "MQARTask"]

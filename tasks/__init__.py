"""Task adapters: the backbones (LM, TTS, summarization, point clouds, time series) that take any
zoo mechanism. Each task lives in its own subpackage, ``tasks/<task>/``."""

"""Tasks: the backbones (LM, TTS, summarization, point clouds, time series) that take any zoo
mechanism, one folder each (``tasks/<task>/``, the shape docs/adding_a_task.md describes), found
by the registry (:mod:`tasks.registry`) and run by the runner's skeleton
(:mod:`runners.execute`); :mod:`tasks.backends` holds what several tasks share (fairseq)."""

"""Backends shared by tasks: the fairseq plug-in (zoo attention inside fairseq's models, its
``fairseq-train`` child process and log parsing), used by the language-modeling and
summarization tasks."""

"""Causal language modeling on PG-19 (fairseq ``transformer_lm`` with any zoo attention)."""

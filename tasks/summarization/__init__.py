"""Long-document summarization on fairseq (encoder self, decoder causal self, cross attention)."""

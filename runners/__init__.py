"""The ``attnbench`` command line, the efficiency benchmark and result records."""

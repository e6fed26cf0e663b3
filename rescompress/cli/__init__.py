"""The ``rescompress`` command line: one file per command, shared options and output in ``common``."""

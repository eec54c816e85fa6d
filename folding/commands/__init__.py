"""Subcommands of the ``folding`` command line, one module each."""

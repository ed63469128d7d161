"""fednano: one command-line front (``fednano``) for the federation's jobs."""

__version__ = "0.1.0"

"""nasprune: two-stage weight-sharing NAS compression for decoder LLMs."""

__version__ = "0.1.0"

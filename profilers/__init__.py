"""nasprune profilers."""

"""nasprune deploy."""

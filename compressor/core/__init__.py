"""What every stage shares and nothing else: errors, atomic outputs, hashing, YAML, the console, workloads,
text data and the precision catalogue. Imports nothing of nasprune's outside ``compressor.core``."""

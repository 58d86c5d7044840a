"""The elastic model: architecture families, the search space, the super-network wrapper (``select``),
extraction of a sub-network, nasprune model dirs, importance + permutation and perplexity evaluation.
The quantization *simulation* lives here because every elastic linear layer runs through it."""

"""Orchestration above every stage: the one ``nasprune`` CLI and the ``compress`` pipeline.

It sits at the top of the package chain (compressor -> profilers -> predictors -> search -> deploy ->
nasprune) because it is the only code that needs every stage at once.
"""

"""Orchestration above every stage: the one ``nasprune`` CLI, the ``compress`` pipeline and the search driver.

It sits at the top of the package chain (compressor -> profilers -> predictors -> deploy -> nasprune)
because it is the only code that needs all four stages at once.
"""

"""The search: NSGA-II over sub-network quality and predicted latency (``search.problem``, a pymoo
``Problem`` with injected callables) and its driver that wires in the predictors (``search.driver``).

It sits after the predictors and before deploy in the package chain
(compressor -> profilers -> predictors -> search -> deploy -> nasprune).
"""

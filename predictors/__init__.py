"""nasprune predictors."""

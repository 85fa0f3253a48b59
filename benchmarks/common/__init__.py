"""What every benchmark shares: one set of models, one timer, one report
writer."""

"""What learns from running the predictor: CSP outcome labels, ranker and heterogeneous training."""

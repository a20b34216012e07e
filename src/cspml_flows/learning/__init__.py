"""Pair labelling, pair features and the learned CSPML similarity model."""

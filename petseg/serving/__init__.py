"""Serving: the predictor over a release, the Seldon and Open Inference Protocol messages, feedback
and its review."""

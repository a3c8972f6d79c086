"""Prediction: backends and runtimes, the one case pipeline, post-processing, output formats,
scale-out."""

"""Scoring: metrics, eval on the dataset and on volumes, score, reports."""

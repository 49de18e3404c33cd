"""Prompt sampling, activation statistics, KL sensitivity, checkpoint export/load, evaluation."""

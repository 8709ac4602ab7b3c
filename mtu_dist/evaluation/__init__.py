"""Evaluation and scoring: dense metrics per split, unlearning metrics, statistics, trajectories."""

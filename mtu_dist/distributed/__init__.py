"""Distributed pieces: process-group set-up, the per-task gradient step and its collectives."""

"""Studies built from runs: the demo, tuning without peeking, scaling sweeps."""

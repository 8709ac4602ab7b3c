"""The run loop and its parts: set-up, train/retrain, unlearn, checkpoints, objectives, run folders."""

"""mtu_dist: interference-aware multi-task unlearning, data-parallel."""

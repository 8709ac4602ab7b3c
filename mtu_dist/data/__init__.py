"""Multi-task data: WebDataset shards, manifests, generators, converters and streams."""

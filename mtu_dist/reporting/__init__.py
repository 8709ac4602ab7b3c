"""MLflow tracking, tables, plots, the benchmark report and sweep comparison, the tracking server."""

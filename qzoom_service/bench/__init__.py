"""`qzoom bench`: the benchmark runner (its synthetic data comes from `qzoom_service.synthetic`)."""

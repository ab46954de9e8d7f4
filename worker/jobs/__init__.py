"""Jobs: the lifecycle every job shares (deliveries, limits, errors, manifest last)."""

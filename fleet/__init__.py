"""Fleet emulation: many virtual devices against the real aggregator, datasets, reports."""

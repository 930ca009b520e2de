"""Workload profiles: access records, recording them, storing and publishing them."""

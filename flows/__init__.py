"""Prefect flows: which slides, in what order, with what concurrency (to come)."""

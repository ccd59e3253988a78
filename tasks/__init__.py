"""Prefect tasks: thin wrappers over slide_clip, one module per pipeline stage (to come)."""

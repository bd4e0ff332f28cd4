"""Meshes and the mapping from the model's logical axis names to mesh axes."""

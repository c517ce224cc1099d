"""Healing: after compression, train only the small parameters it created to match the original model."""

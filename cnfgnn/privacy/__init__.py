"""Differential privacy for node uploads and its accounting (docs/privacy.md)."""

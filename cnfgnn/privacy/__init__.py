"""Differential privacy for node uploads and its accounting (issue 8)."""

"""Datasets: every one returns the project's sample dict (see DESIGN.md section 7)."""

from .synthetic import SyntheticDataset, render_pair

__all__ = ["SyntheticDataset", "render_pair"]

"""Analysis of trained models: per-class relative contributions between channels."""

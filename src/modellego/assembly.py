"""Assembly of components."""

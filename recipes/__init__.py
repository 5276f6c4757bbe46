"""Bundled YAML recipes."""

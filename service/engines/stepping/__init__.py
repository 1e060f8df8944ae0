"""Continuous batching for the torch engine: see session.py."""

"""trajinf.models."""

"""trajinf.data."""

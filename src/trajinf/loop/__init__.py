"""trajinf.loop."""

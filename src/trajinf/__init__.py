"""trajinf: gradient-based influence for agent trajectories."""

__version__ = "0.1.0"

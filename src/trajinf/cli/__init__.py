"""trajinf.cli.app."""

"""trajinf.selection.select."""

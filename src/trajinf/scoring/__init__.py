"""trajinf.scoring.scores."""

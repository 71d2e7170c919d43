"""trajinf.job."""

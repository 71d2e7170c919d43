"""trajinf.train.sft."""

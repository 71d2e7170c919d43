"""trajinf.store.feature_store."""

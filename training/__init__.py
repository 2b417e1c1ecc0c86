"""Training support: the training config (every flag with its metadata), checkpointing, the run log and curves."""

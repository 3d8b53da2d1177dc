"""Classic (pre-deep) multi-task learning."""

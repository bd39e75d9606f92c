"""Model zoos: ModelSet500's slices, whole-model files, the manifest, staging for a lent
machine, the functional probe, readers of foreign checkpoints."""

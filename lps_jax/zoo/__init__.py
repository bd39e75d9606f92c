"""Model zoos: ModelSet500's slices, whole-model files, the manifest, staging for a lent machine, readers of foreign checkpoints."""

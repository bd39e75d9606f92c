"""Methods that name a model's task from its parameters: the interface, the registry,
probes, whole-network methods, the invariant network."""

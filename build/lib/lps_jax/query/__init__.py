"""The query index: which known task a checkpoint is closest to."""

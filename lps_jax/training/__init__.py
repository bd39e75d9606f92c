"""First-order training: ResNet-20 populations as stacked pytrees (configs, data, the pure step, popmap, the resumable trainer, its work folders, multi-process, oneDNN)."""

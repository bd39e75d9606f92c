"""First-order training: ResNet-20 populations as stacked pytrees (configs, data, the pure
step, popmap, the resumable trainer and its hooks, work folders, multi-process, oneDNN)."""

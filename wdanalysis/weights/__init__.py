"""Weights: which matrices to analyse, what kind each is (component, stack, attention
kind, layer), which are stored (in, out), how fused projections split into q/k/v
(gate/up) by the model's config, and each checkpoint's effective weight bound to the base
keys. May import loaders, storage and errors."""

"""Weights: which matrices to analyse, what kind each is (component, stack, attention
kind, layer), which are stored (in, out), and each checkpoint's effective weight bound to
the base keys. May import loaders, storage and errors."""

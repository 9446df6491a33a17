"""Weights: which matrices to analyse, which are stored (in, out), and each checkpoint's
effective weight bound to the base keys. May import loaders, storage and errors."""

"""The engine: decomposition maths (Eqs. 2-4), the C kernel, block-wise streaming (per part
of a fused weight) and the live model view. May import weights, loaders, storage and
errors; nothing above."""

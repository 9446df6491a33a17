"""Plots and reports: Figure 2, trajectories, per-seed correlations and the files
``compare --out`` writes. May import stats, table, storage and errors."""

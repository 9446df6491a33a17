"""The tidy table: its schema, :func:`~wdanalysis.compare` that fills it and ``inspect``.
May import the engine, weights, loaders, storage and errors."""

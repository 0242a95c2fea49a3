"""The GAIR trainer, one module per job (see :mod:`gair_model.train` for the entry point)."""

"""Edit data sets, one module per experiment; each yields batches with the roles
edit_inner / edit_outer / loc / cond (see data_classes/gen.py for the layout)."""


class DataError(ValueError, RuntimeError):
    """Bad or unusable edit data; the message names the file, key or option and what to do."""

"""Errors the CLI reports as one line (``error: ...``, exit code 2); kept free of heavy imports so that the CLI
can name them before torch is loaded."""


class CellBusy(RuntimeError):
    """Another job holds the cell's lock."""

"""Exceptions that carry a message meant for the user, not a traceback."""


class LayerscopeError(Exception):
    """Bad input the user can fix (a missing file, a corrupt header, an unknown metric).

    The CLI prints the message as one line and exits with status 2; the Python API lets it
    propagate so callers can catch one exception type.
    """


class TensorReadError(LayerscopeError):
    """One tensor could not be read; the others are still analysed (exit status 1)."""

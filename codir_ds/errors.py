"""The one exception type that entry points turn into a one-line message."""


class CodirError(ValueError):
    """Bad user input (config, path, data, checkpoint), reported in one line without a traceback."""

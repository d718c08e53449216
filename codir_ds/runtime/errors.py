"""The one exception type that entry points turn into a one-line message."""


class CodirError(ValueError):
    """Bad user input (config, path, data, checkpoint), reported in one line without a traceback."""


def error_line(err: BaseException, index: int = 0, limit: int | None = None) -> str:
    """Line `index` of a caught exception's non-empty message lines (the last one if fewer), for a
    one-line report; the exception's type name when its message is empty."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[min(index, len(lines) - 1)][:limit]

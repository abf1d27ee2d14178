"""User-facing errors: one clear line, never a traceback."""


class DKError(Exception):
    """An error caused by the user's input (recipe, data, override, file).

    The CLI prints ``error: <message>`` and exits with status 2. The message says
    what is wrong, which key or file, and what to do.
    """

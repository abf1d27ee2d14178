"""User-facing errors: one clear line, never a traceback."""


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``), so that
    a message quoting a user's key or value stays on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DKError(Exception):
    """An error caused by the user's input (recipe, data, override, file).

    The CLI prints ``error: <message>`` and exits with status 2. The message says
    what is wrong, which key or file, and what to do. It is one line whatever it
    quotes: control characters in it are shown escaped.
    """

    def __str__(self) -> str:
        return one_line(super().__str__())

"""The one exception the data layer raises for problems a user can fix."""


class DatasetError(ValueError):
    """A dataset or loader problem, described in one line that names the problem and the fix.

    Raised while loaders are built (before any model exists) so the trainer can print the message
    and exit non-zero instead of failing mid-epoch.
    """

    def __init__(self, message: str):
        # Keep it to one line: the trainer prints str(error) as-is.
        super().__init__(printable(" ".join(str(message).split())))


def printable(text: str) -> str:
    """`text` with the undecodable bytes of non-UTF-8 file names (held as surrogates) shown as \\xNN.

    A strict UTF-8 stream (stdout, a log file) refuses to write surrogates, which would turn the
    one-line message into an encoding traceback.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

"""The one exception the data layer raises for problems a user can fix."""


class DatasetError(ValueError):
    """A dataset or loader problem, described in one line that names the problem and the fix.

    Raised while loaders are built (before any model exists) so the trainer can print the message
    and exit non-zero instead of failing mid-epoch.
    """

    def __init__(self, message: str):
        # Keep it to one line: the trainer prints str(error) as-is.
        super().__init__(" ".join(str(message).split()))

"""One exception type for every mistake a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input, a bad flag or a missing file: the message names the problem and the fix."""


class DataError(UserError):
    """A dataset file is missing, corrupt, or does not fit the hierarchy."""

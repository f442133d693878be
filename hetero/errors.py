"""The one exception type for mistakes a user can make (bad config, missing file, plan that does not fit)."""


class HeteroError(Exception):
    """An error caused by input: the message says what was asked, what exists, and what to do."""

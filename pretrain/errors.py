"""The one exception type for mistakes a user can make.

Bad configs, CLI arguments, missing files and corrupt shards or checkpoints
raise `UserError` with a message that names the problem and the fix. The CLI
turns it into one line on stderr and exit status 2, never a traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class RunFailure(Exception):
    """The job itself failed (a hung peer, a diverged run): one line and exit 1, so a launcher restarts it."""

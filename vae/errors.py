"""The one base class for problems a user can fix (bad flag, data, model, checkpoint, weights, Hub).

Library code raises a subclass with a one-line message; only the scripts' `main` catch
`UserError`, print `<prog>: error: <message>` and exit with status 2. Anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line meant for them."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from (missing, incomplete, unsafe or from another setup)."""


class HubError(UserError):
    """The Hugging Face Hub cannot be used as asked (no token, offline, a repository one cannot write to)."""

"""The one family of errors a user can fix (bad flag, data, model, checkpoint, weights, metric, Hub).

Library code raises a subclass with a one-line message; only the scripts' `main` catch
`UserError`, print `<prog>: error: <message>` and exit with status 2. Anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line meant for them."""


class ConfigError(UserError, ValueError):
    """A bad flag or value."""


class DataError(UserError, ValueError):
    """A problem with the data configuration, reported before training starts."""


class ModelError(UserError, ValueError):
    """A model preset, config or checkpoint that cannot be used."""


class PerceptionWeightsError(UserError, RuntimeError):
    """Weights of a frozen perception network (VGG16 for LPIPS, MoCo for ID) are missing or wrong."""


class MetricError(UserError, ValueError):
    """A metric that cannot be built or computed (e.g. missing Inception weights)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from (missing, incomplete, unsafe or from another setup)."""


class HubError(UserError):
    """The Hugging Face Hub cannot be used as asked (no token, offline, a repository one cannot write to)."""


class ModelCardError(UserError):
    """A model card (README.md) that cannot be read or updated."""

"""The one error base class for things a user can fix: a bad path, file, value or input.

Every CLI (`main`, `convert`, `chat`, `data_pipeline.preprocess`) catches `UserError` and prints its
message as one line, naming the file or field, then exits non-zero. Anything else escaping is a
bug and keeps its traceback. The data pipeline's errors subclass it too, so no CLI needs a list.
"""


class UserError(Exception):
    """A problem the message fully explains (what, where, and how to fix it when known)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field."""

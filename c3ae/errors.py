"""The one base of the errors c3ae raises on purpose.

A :class:`C3AEError` is a user's mistake, a broken environment or bad data: the command line prints its
message as one sentence and exits with its ``exit_code`` (2 for a mistake in the call, 1 for a broken file,
install or environment). Any other exception escaping c3ae is a bug and shows its traceback. Subclasses
also derive from the built-in error they used to be (``ValueError``, ``RuntimeError``, ...), so code that
catches those keeps working.
"""

from __future__ import annotations


class C3AEError(Exception):
    """Base of every error c3ae raises on purpose; ``exit_code`` is the CLI's exit status for it.

    ``parameter``: the library parameter the message starts with (``"output"``, ``"jsonl"``), which the
    command line shows as its flag (``--output``): see :meth:`cli_message`.
    """

    exit_code = 2

    def __init__(self, *args, parameter: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)  # ImportError's name= and path=, for MissingExtraError
        self.parameter = parameter

    def cli_message(self, flags: dict[str, str] | None = None) -> str:
        """The message with its leading parameter name replaced by the command's flag (``flags`` maps
        names to flags; default ``--name-with-dashes``)."""
        message = str(self)
        if not self.parameter or not message.startswith(self.parameter):
            return message
        flag = (flags or {}).get(self.parameter, "--" + self.parameter.replace("_", "-"))
        return flag + message[len(self.parameter) :]


class UsageError(C3AEError, ValueError):
    """A call with an argument that cannot work (an unknown name, a value out of range)."""


class DataError(C3AEError, ValueError):
    """A manifest, shard or dataset that cannot be used as asked; the message names it."""


class BrokenFileError(C3AEError, RuntimeError):
    """A file c3ae needs is broken or missing from the install; exit status 1."""

    exit_code = 1

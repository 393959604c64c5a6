"""The errors that reach the user as one line (the command line catches these), and how an error reads to a user:
kept free of heavy imports so that the command line can name them without loading torch. Each is re-exported by the
module that raises it."""

import reprlib

MESSAGE_LIMIT = 20_000  # characters of one error message; more is cut, saying how much


class DataError(ValueError):
    """A problem with the user's data: the message names the file and what is wrong."""


class ConfigError(ValueError):
    """An invalid setting; the message names the flag."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and why."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says where and what was kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (save, then exit). A subclass on purpose: CPython kills itself with SIGINT at
    exit when a *plain* KeyboardInterrupt passed through certain C-level frames, even if it was caught later."""


class ExportError(RuntimeError):
    """A model cannot be exported (or the export does not match the model); the message says why."""


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxdict, _QUOTE.maxset = 3, 6, 6, 6, 6
_QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 80, 80, 40


def quote(value) -> str:
    """``repr(value)`` bounded in size, however large or deeply nested the value (a YAML alias bomb expands to
    gigabytes when printed whole): what a message quotes of the user's input."""
    return _QUOTE.repr(value)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or "" when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def for_user(exc: BaseException) -> str:
    """What a command prints for an error it stops on: an OS error on a file (a full disk, a read-only or forbidden
    destination) as "FILE: reason"; every other error's own message."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc)
    if len(text) > MESSAGE_LIMIT:
        text = text[:MESSAGE_LIMIT] + f" ... ({len(text) - MESSAGE_LIMIT:,} more characters)"
    return text

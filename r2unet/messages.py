"""Turning exceptions into one readable line for the user."""

from __future__ import annotations

import difflib
import reprlib

MESSAGE_LIMIT = 20_000  # characters of one error message; more is cut, saying how much

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


def parse_command_line(parser, argv: list[str]):
    """``parser.parse_args(argv)``, but a flag the command does not have is named by the command's own parser (its
    usage, not the top level's) and, when it is a near miss, with the flag meant: ``--batchsize`` -> "did you mean
    --batch_size?". Checked before parsing too, so that the hint comes before "the following arguments are
    required" (``--chekpoint``). Needs each command's parser in its defaults as ``parser``."""
    commands = next((a.choices for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)),
                    {})
    command = commands.get(next((a for a in argv if not a.startswith("-")), None))
    if command is not None and (hint := _unknown_flags([a for a in argv if a.startswith("--")], command, True)):
        command.error(hint)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.parser.error(_unknown_flags(unknown, args.parser, False))
    return args


def _unknown_flags(args: list[str], parser, near_misses_only: bool) -> str:
    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    unknown = [a for a in args if not any(k.startswith(a.split("=", 1)[0]) for k in known)]  # abbreviations pass
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and (close := difflib.get_close_matches(flag, known, n=1, cutoff=0.75)):
            hints.append(f"{flag}: did you mean {close[0]}?")
    if near_misses_only and not hints:
        return ""
    return f"unrecognized arguments: {' '.join(unknown)}" + ("; " + "; ".join(hints) if hints else "")

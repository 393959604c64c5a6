"""Reading a command line: a flag the command does not have is named by the command's own usage, with the flag
meant when it is a near miss."""

import difflib


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

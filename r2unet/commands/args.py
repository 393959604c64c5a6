"""The command line's flags: train's, one per ``TrainConfig`` setting (``add_train_flags``), those of the commands
that use a trained model (``add_checkpoint_flags``), their types, and reading a command line (a flag the command does
not have is named by the command's own usage, with the flag meant when it is a near miss)."""

import argparse
import dataclasses
import difflib

from .. import defaults
from ..engine.config import AMP_CHOICES, TrainConfig
from ..models import list_models

# The reference's flags that are not settings themselves: --apex and its level map onto --amp, --world-size is
# checked against torchrun's process count, --config names a file of settings.


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


# ----------------------------------------------------------------------------------------------- the train flags
# The reference's flags that are not settings themselves: --apex and its level map onto --amp, --world-size is
# checked against torchrun's process count, --config names a file of settings.
EXTRA_FLAGS = {
    "config": dict(help="YAML/TOML/JSON file of settings (keys are the flag names); flags given override it "
                        "(default: none)"),
    "apex": dict(type=int, choices=[0, 1], seed=True,
                 help="1: mixed precision (fp16 with O1/O2 on GPUs; on CPUs bf16 where native, else float32) "
                      "(default: not given, --amp decides)"),
    "apex_opt_level": dict(choices=["O0", "O1", "O2"], seed=True, names=("--apex-opt-level", "--apex_opt_level"),
                           help="O1/O2 with --apex 1: mixed precision; O0: float32 (default: O1)"),
    "world_size": dict(type=int, seed=True, names=("--world-size", "--world_size"),
                       help="number of processes; launch them with torchrun (default: the processes torchrun "
                            "started)"),
}


_TYPES = {"int": int, "float": float, "str": str}


def add_train_flags(parser) -> None:
    """One flag per TrainConfig field (help, choices and default from the field), the reference's first, then the
    reference's non-setting flags (EXTRA_FLAGS). Flags not given stay out of the parsed namespace
    (``argparse.SUPPRESS``), so ``train_settings`` sees what the user typed."""
    groups = {True: parser.add_argument_group("the reference's flags"), False: parser.add_argument_group("r2unet")}
    for f in dataclasses.fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        name = f.metadata["flag"] or f.name
        base = f.type.replace("| None", "").strip()
        shown = "None" if f.default is None else f.default
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {shown})")
        if base != "bool" and not f.metadata["choices"]:
            kwargs["metavar"] = name.upper()
        if base == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _TYPES[base]
            if f.metadata["choices"]:
                kwargs["choices"] = list(f.metadata["choices"])
        groups[f.metadata["seed"]].add_argument(f"--{name}", **kwargs)
    for dest, spec in EXTRA_FLAGS.items():
        spec = dict(spec)
        names, seed = spec.pop("names", (f"--{dest}",)), spec.pop("seed", False)
        groups[seed].add_argument(*names, dest=dest, default=argparse.SUPPRESS, **spec)


# ------------------------------------------------------------------ flags of the commands that use a trained model
def probability(text: str) -> float:
    """argparse type of a --threshold: a probability strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (--batch_size)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type of a size that must be a positive, finite number (--max_mb)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_checkpoint_flags(p, batch_size: int | None = None) -> None:
    """The flags of the commands that use a trained model (evaluate, predict, serve, export): --checkpoint, the
    model overrides, the input size, and with ``batch_size`` (0: the device's) those of the commands that segment
    images, which also take several models (an ensemble)."""
    ensemble = batch_size is not None
    p.add_argument("--checkpoint", required=True, action="append" if ensemble else "store",
                   help="r2unet checkpoint, a run folder (its best.pt), .safetensors, an .onnx from 'r2unet export', "
                        "or the reference's .pkl" + ("; given more than once (or a folder of runs), the models' "
                                                     "probabilities are averaged: an ensemble" if ensemble else ""))
    p.add_argument("--model_type", choices=list_models(), default=None,
                   help="overrides the checkpoint's (a bare state_dict's is read from its weights)")
    p.add_argument("--t", type=int, default=None, help="recurrence steps: a bare state_dict's weights do not "
                   "record them (default: the reference's training default, 3); overrides the checkpoint's")
    p.add_argument("--base_channels", type=int, default=None, help="overrides the checkpoint's (a bare "
                   "state_dict's is read from its weights)")
    p.add_argument("--image_size", type=int, default=None, help="network input size (default: the checkpoint's)")
    if batch_size is None:
        return
    device_s = (f"{defaults.PREDICT_BATCH} on a GPU, {defaults.PREDICT_BATCH_CPU} on a CPU, where smaller batches "
                "ran faster")
    p.add_argument("--batch_size", type=positive_int, default=batch_size or None,
                   help=f"images per forward pass (default: {batch_size or device_s})")
    p.add_argument("--threshold", type=probability, default=None,
                   help=f"default: the checkpoint's ({defaults.THRESHOLD} unless it was trained with another)")
    p.add_argument("--tta", action="store_true", help="average the probabilities of flipped inputs")
    p.add_argument("--postprocess", choices=["auto", "none"], default="auto",
                   help="auto: apply the postprocessing chosen on the validation split that the run (or the "
                        "cross-validation folder, or the ONNX file) stores; none: the network's masks as they are")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", choices=["auto", "torch"], default="auto",
                   help="auto: on a CPU, run the model 'r2unet export --int8' made from the checkpoint if the "
                        "run folder holds one (where PyTorch would run float32, a plain ONNX export too); torch: the "
                        "checkpoint itself")
    p.add_argument("--amp", choices=list(AMP_CHOICES), default=None,
                   help="precision of the forward pass; default: the checkpoint's training setting (auto for a "
                        "reference checkpoint), so scores match the run's; auto: bf16 on GPUs and on CPUs with "
                        "native bf16 (AMX / AVX512-BF16), float32 on other CPUs (and channels_last where training "
                        "uses it); off: float32")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """'(default: X)' after every flag whose help does not already say its default."""
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS \
                or action.help is argparse.SUPPRESS or "default" in (action.help or ""):
            continue
        action.help = f"{action.help} (default: {default})" if action.help else f"default: {default}"

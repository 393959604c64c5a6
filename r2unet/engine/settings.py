"""The settings ``train`` runs with, resolved once: ``train_settings`` (defaults < preset < config file < a resumed
run's settings < the flags given). The commands that use a trained model resolve theirs once too, in
``inference.load_for_inference``: the checkpoint's settings < the flags given (``TrainConfig.updated``)."""

from __future__ import annotations

import json
import os

from ..defaults import PRESETS
from .checkpoint import RunFiles, load_file, require_training_state
from .config import ConfigError, TrainConfig, load_class_colors, read_config_file
from .runtime import device_type


def train_settings(given: dict, log=print) -> TrainConfig:
    """The run's settings from the flags ``given`` on the command line: defaults < the ``--preset`` (named on the
    command line or in the config file) < the ``--config`` file < on ``--resume``, the settings the run was started
    with (its last.pt) < the flags given. The reference's ``--apex`` maps onto ``--amp`` (unless --amp is given),
    ``--world-size`` must match the processes torchrun started, and a default decay longer than a short run becomes
    the whole run (said in a line)."""
    given = dict(given)
    from_file = read_config_file(given.pop("config")) if "config" in given else {}
    preset = given.get("preset", from_file.get("preset"))
    values: dict = dict(PRESETS.get(preset, {}))  # an unknown name is said by validate()
    values.update(from_file)
    apex, level = given.pop("apex", None), given.pop("apex_opt_level", "O1")
    if "amp" not in given and apex is not None:
        given["amp"] = "fp16" if apex and level in ("O1", "O2") else "off"
    if "loss_scale" in given:
        given["loss_scale"] = str(given["loss_scale"])
    world = given.pop("world_size", None)
    if world is not None and world > 1 and int(os.environ.get("WORLD_SIZE", "1")) != world:
        raise ConfigError(f"--world-size {world}: launch the processes with torchrun, e.g. "
                          f"'torchrun --nproc_per_node={world} -m r2unet train ...' (see README, Multi-GPU)")
    resume = given.get("resume", values.get("resume", False))
    typed = "num_epochs_decay" in given or "num_epochs_decay" in from_file  # on this command line or in --config
    decay_from = "defaults to {}"  # else a decay nobody typed now (the default, or the resumed run's) adapts
    if resume:
        last = RunFiles(given.get("output_dir", values.get("output_dir", TrainConfig.output_dir))).last
        if last.exists():
            saved = require_training_state(load_file(last), last)["config"]
            values.update({k: v for k, v in saved.items() if k != "extra"})
            if "num_epochs_decay" in saved:
                decay_from = "was {} in the resumed run"
    compiles_as_saved = resume and "compile" not in given and values.get("compile") == "auto"
    values.update(given)
    if values.get("class_colors") and not str(values["class_colors"]).lstrip().startswith("["):
        # the run keeps the colours themselves, not the path of a file that may change or go
        values["class_colors"] = json.dumps(load_class_colors(values["class_colors"], values.get("num_classes", 1)))
    values["resume"] = bool(resume)
    for once in ("accept_split_change", "no_memory_check"):  # for this command only, never carried by --resume
        values[once] = bool(given.get(once))
    epochs = values.get("num_epochs", TrainConfig.num_epochs)
    decay = values.get("num_epochs_decay", TrainConfig.num_epochs_decay)
    shorter = not typed and decay > epochs
    if shorter:
        values["num_epochs_decay"] = epochs
    cfg = TrainConfig.from_dict(values).validate()
    first_rank = int(os.environ.get("RANK", "0")) == 0  # say it once per job, and only for settings that are valid
    if shorter and first_rank:
        log(f"note: --num_epochs_decay {decay_from.format(decay)} > --num_epochs {epochs}; decaying over all "
            f"{epochs} epochs")
    if compiles_as_saved and first_rank and device_type(cfg.device) == "cuda":
        log("note: this run was saved with --compile auto (the default before), so its step is compiled on this "
            "GPU; compiled runs validated worse than eager ones on an H200 (benchmarks/README.md) and new runs no "
            "longer compile by default. Add --compile off to continue it eagerly")
    return cfg


"""The one training configuration: a dataclass, validated once, merged from defaults < config file < command line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models import SIZE_MULTIPLE, list_models

# torch.compile modes; reduce-overhead adds CUDA graphs (GPU only), max-autotune searches kernels (slow to compile)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """An invalid setting; the message names the flag."""


@dataclass
class TrainConfig:
    # model (the reference's flags)
    model_type: str = "R2U_Net"
    t: int = 3  # the reference's default recurrence steps
    img_ch: int = 3
    output_ch: int = 1
    base_channels: int = 64
    image_size: int = 224
    # optimisation (the reference's defaults: Adam lr 2e-4, betas 0.5/0.999, linear decay over the last epochs)
    num_epochs: int = 100
    num_epochs_decay: int = 70
    batch_size: int = 16  # per process
    global_batch_size: int | None = None  # alternative to batch_size: divided by the number of processes
    scale_lr: bool = False  # linear scaling rule: lr x (global batch / lr_batch_size) e.g. 8p: 8 x 2e-4 = 0.0016
    lr_batch_size: int | None = None  # the batch --lr was tuned for (default: batch_size, i.e. lr x processes)
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    loss: str = "bce"  # bce | dice_bce
    augmentation_prob: float = 0.4
    # data
    data_path: str = "./dataset"
    cache_dir: str | None = None
    num_workers: int = 2
    skip_bad: bool = False
    # run
    output_dir: str = "runs/r2unet"
    seed: int = 12345
    device: str = "auto"  # auto | cuda | cpu (| cuda:N)
    device_index: int | None = None  # the seed's --npu_idx
    amp: str = "auto"  # auto | off | fp16 | bf16
    loss_scale: str = "dynamic"  # initial GradScaler scale for fp16: a number or "dynamic"
    compile: str = "auto"  # auto | on | off
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune...
    channels_last: str = "auto"  # auto | on | off
    sync_bn: bool = False
    dist_timeout_s: float = 600.0  # bound on every collective: a dead rank makes the others fail, not hang
    deterministic: bool = False
    detect_anomaly: bool = False
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before training stops
    warmup_steps: int = 5  # steps per epoch excluded from the FPS measurement
    max_steps_per_epoch: int | None = None  # for performance runs
    eval_every: int = 1
    sample_every: int = 5  # epochs between sample grids
    save_every_steps: int = 0  # also write last.pt every N steps inside an epoch (0: only at epoch ends)
    log_every: int = 10
    tensorboard: bool = False
    threshold: float = 0.5
    resume: bool = False
    extra: dict = field(default_factory=dict)  # unknown keys of older configs, kept for the record

    def validate(self) -> TrainConfig:
        def bad(flag: str, msg: str):
            raise ConfigError(f"--{flag}: {msg}")

        if self.model_type not in list_models():
            bad("model_type", f"unknown model {self.model_type!r}; choose one of {', '.join(list_models())}")
        if self.t < 1:
            bad("t", f"recurrence steps must be >= 1, got {self.t}")
        if self.image_size < SIZE_MULTIPLE or self.image_size % SIZE_MULTIPLE:
            near = max(SIZE_MULTIPLE, round(self.image_size / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            bad("image_size", f"must be a positive multiple of {SIZE_MULTIPLE} (4 poolings); "
                f"got {self.image_size}, nearest valid is {near}")
        for name in ("img_ch", "output_ch", "base_channels", "num_epochs", "batch_size", "eval_every",
                     "sample_every", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.img_ch not in (1, 3):
            bad("img_ch", f"must be 1 (grayscale) or 3 (RGB), got {self.img_ch}")
        if self.lr_batch_size is not None and self.lr_batch_size < 1:
            bad("lr_batch_size", f"must be >= 1, got {self.lr_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            bad("global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        if not 0 <= self.num_epochs_decay <= self.num_epochs:
            bad("num_epochs_decay", f"must be between 0 and --num_epochs ({self.num_epochs}), "
                f"got {self.num_epochs_decay}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, f"must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.augmentation_prob <= 1:
            bad("augmentation_prob", f"must be in [0, 1], got {self.augmentation_prob}")
        if not 0 < self.threshold < 1:
            bad("threshold", f"must be in (0, 1), got {self.threshold}")
        for name, choices in (("amp", ("auto", "off", "fp16", "bf16")), ("compile", ("auto", "on", "off")),
                              ("compile_mode", COMPILE_MODES),
                              ("channels_last", ("auto", "on", "off")), ("loss", ("bce", "dice_bce"))):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.num_workers < 0:
            bad("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.dist_timeout_s < 10:
            bad("dist_timeout_s", f"must be >= 10 seconds, got {self.dist_timeout_s}")
        if self.warmup_steps < 0 or self.save_every_steps < 0:
            bad("warmup_steps" if self.warmup_steps < 0 else "save_every_steps", "must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            bad("max_steps_per_epoch", f"must be >= 1, got {self.max_steps_per_epoch}")
        if self.loss_scale != "dynamic":
            try:
                if float(self.loss_scale) <= 0:
                    raise ValueError
            except ValueError:
                bad("loss_scale_value", f"must be a positive number or 'dynamic', got {self.loss_scale!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        unknown = {k: v for k, v in values.items() if k not in names}
        cfg = cls(**known)
        cfg.extra = {**cfg.extra, **unknown}
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_config_file(path: str | Path) -> dict:
    """Settings from a YAML (.yaml/.yml), TOML (.toml) or JSON file, as a flat dict of TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file {path} not found")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: tomllib arrived in 3.11; tomli is the same parser
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError(f"--config: reading {path} needs Python >= 3.11 or 'pip install tomli'; "
                                  "YAML and JSON configs work everywhere") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parser error is the user's file
        raise ConfigError(f"--config: cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of settings")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"--config: unknown setting(s) in {path}: {', '.join(unknown)}")
    return {name: _typed(name, value, types[name], path) for name, value in data.items()}


def _typed(name: str, value, type_name: str, path: Path):
    """A config file's value as the field's type (an int where a float is wanted, a number where a string is, as
    YAML writes `loss_scale: 128`); anything else is the file's mistake, named with the setting."""
    base, optional = type_name.replace("| None", "").strip(), "None" in type_name
    if value is None and optional:
        return None
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, (str, int, float)) and not isinstance(value, bool),
          "dict": isinstance(value, dict)}.get(base, True)
    if not ok:
        kind = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string",
                "dict": "a mapping"}[base]
        raise ConfigError(f"--config: {name} in {path} must be {kind}"
                          + (" (or null)" if optional else "") + f", got {value!r}")
    return float(value) if base == "float" else str(value) if base == "str" else value

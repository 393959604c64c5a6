"""The one training configuration: a dataclass, validated once, merged from defaults < config file < command line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..data.targets import check_classes
from ..errors import ConfigError, quote
from ..fileio import atomic_write_text
from ..models import SIZE_MULTIPLE, list_models

LOSSES = ("bce", "dice_bce", "focal", "tversky")  # --loss; the task computes them (engine.task)

# torch.compile modes; reduce-overhead adds CUDA graphs (GPU only), max-autotune searches kernels (slow to compile)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AMP_CHOICES = ("auto", "off", "fp16", "bf16")


def setting(default, help: str, *, choices=None, seed: bool = False, flag: str | None = None):
    """A TrainConfig field and its ``train`` flag: ``help`` (the default is added to it), ``choices``, ``seed``: one
    of the reference's own flags (listed first in --help), ``flag``: the flag's name where it is not the field's."""
    return field(default=default, metadata={"help": help, "choices": choices, "seed": seed, "flag": flag})


AMP_HELP = ("mixed precision: auto is bf16 on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), float32 on "
            "other CPUs, where bf16 is emulated and slow")


@dataclass
class TrainConfig:
    """Every setting of a training run. Each field is a ``train`` flag of the same name (``setting``'s metadata)."""

    # model (the reference's flags)
    model_type: str = setting(defaults.MODEL_TYPE, "network", choices=tuple(list_models()), seed=True)
    t: int = setting(defaults.T, "recurrence steps of R2U_Net / R2AttU_Net; 3 is the reference's training default",
                     seed=True)
    image_size: int = setting(defaults.IMAGE_SIZE, "square training size, a multiple of 16", seed=True)
    img_ch: int = setting(3, "input channels: 3 (RGB) or 1 (grayscale)", seed=True)
    output_ch: int = setting(1, "output channels: 1 (binary), or --num_classes (what label maps need)", seed=True)
    num_classes: int = setting(1, "1: binary masks (sigmoid, the reference's); K >= 2: label maps of K classes, the "
                                  "background included (softmax)")
    class_colors: str | None = setting(None, "JSON/YAML list of [r, g, b] per class, for label maps stored as RGB "
                                             "colours (palette and grayscale maps hold the class indices)")
    base_channels: int = setting(defaults.BASE_CHANNELS, "width of the first stage (the reference's networks)")
    step_stats: bool = setting(False, "R2U_Net / R2AttU_Net: BatchNorm statistics of their own for each recurrence "
                                      "step (the reference shares one set over the t + 1 steps, which averages "
                                      "different distributions: validation swings and scores lower). Same weights; "
                                      "its checkpoints hold extra statistics, which r2unet loads (and which a "
                                      "reference checkpoint gets from its shared ones)")
    preset: str | None = setting(None, "a named set of the settings above and below, which the flags given "
                                       "override: laptop (a small R2U-Net for a CPU) or gpu (the reference's "
                                       "recipe); see the README", choices=tuple(defaults.PRESETS))
    # optimisation (the reference's defaults: Adam lr 2e-4, betas 0.5/0.999, linear decay over the last epochs)
    num_epochs: int = setting(100, "epochs", seed=True)
    num_epochs_decay: int = setting(70, "epochs of linear LR decay at the end (at most --num_epochs; when not "
                                        "given and longer than a short run, the whole run)", seed=True)
    batch_size: int = setting(defaults.BATCH_SIZE, "per process", seed=True)
    global_batch_size: int | None = setting(None, "alternative to --batch_size: divided among the processes")
    scale_lr: bool = setting(False, "linear scaling rule: multiply --lr by the global batch / --lr_batch_size, i.e. "
                                    "by the number of processes by default (the 8p recipe: 8 x 2e-4 = 0.0016)")
    lr_batch_size: int | None = setting(None, "with --scale_lr: the batch size --lr was tuned for (None: "
                                              "--batch_size); --batch_size 64 --lr_batch_size 16 --scale_lr trains "
                                              "one GPU at 4 x --lr")
    lr: float = setting(2e-4, "Adam learning rate", seed=True)
    beta1: float = setting(0.5, "Adam beta1", seed=True)
    beta2: float = setting(0.999, "Adam beta2", seed=True)
    loss: str = setting("bce", "bce (the reference's); dice_bce (BCE + soft Dice); focal (BCE weighted towards hard "
                               "pixels, --focal_gamma); tversky (soft Tversky, --tversky_alpha on false positives, "
                               "--tversky_beta on false negatives: beta > alpha favours finding small lesions). "
                               "Label maps: softmax cross-entropy in place of BCE", choices=LOSSES)
    focal_gamma: float = setting(2.0, "with --loss focal: the exponent of (1 - p); 0 is plain BCE")
    tversky_alpha: float = setting(0.3, "with --loss tversky: the weight of false positives")
    tversky_beta: float = setting(0.7, "with --loss tversky: the weight of false negatives")
    precise_bn: int = setting(32, "before each validation, recompute the BatchNorm statistics on this many fixed "
                                  "batches of training images (no gradient), so that validation and the kept "
                                  "checkpoints see statistics of the weights they hold; 0: off (the running "
                                  "averages of training, as the reference)")
    ema: float = setting(0.0, "decay of an exponential moving average of the weights (updated every step), which is "
                              "validated, kept in best.pt and tested instead of the weights; 0: off. It averages "
                              "about the last 1 / (1 - EMA) steps: 0.95 for runs of a few hundred steps, 0.999 for "
                              "tens of thousands")
    augmentation_prob: float = setting(0.4, "probability of each augmentation", seed=True)
    # data
    data_path: str = setting("./dataset", "prepared dataset: train/ train_GT/ valid/ valid_GT/ test/ test_GT/",
                             seed=True)
    cache_dir: str | None = setting(None, "where the decode-once cache lives (None: DATA_PATH/.r2unet_cache)")
    num_workers: int = setting(2, "data loader processes", seed=True)
    skip_bad: bool = setting(False, "list and skip bad files instead of stopping")
    # run
    output_dir: str = setting("runs/r2unet", "run folder")
    seed: int = setting(12345, "random seed", seed=True)
    device: str = setting("auto", "auto | cuda | cpu | cuda:N")
    device_index: int | None = setting(None, "GPU index (the reference's flag; alias of cuda:N)", seed=True,
                                       flag="npu_idx")
    amp: str = setting("auto", AMP_HELP, choices=AMP_CHOICES)
    loss_scale: str = setting("dynamic", "initial fp16 loss scale, a number or 'dynamic'", seed=True,
                              flag="loss_scale_value")
    compile: str = setting("off", "torch.compile: on is ~20 %% faster on GPUs, but compiled runs validated worse "
                                  "than eager ones on an H200 (benchmarks/README.md); auto: on for CUDA",
                           choices=("auto", "on", "off"))
    compile_mode: str = setting("default", "torch.compile mode (reduce-overhead adds CUDA graphs)",
                                choices=COMPILE_MODES)
    channels_last: str = setting("auto", "memory format (auto: on for CUDA, and on CPUs with native bf16 from "
                                         "--base_channels 16)", choices=("auto", "on", "off"))
    sync_bn: bool = setting(False, "SyncBatchNorm across processes")
    dist_timeout_s: float = setting(600.0, "seconds before a collective waiting on a dead process fails")
    deterministic: bool = setting(False, "bit-identical CPU runs (see README for GPUs)")
    detect_anomaly: bool = setting(False, "autograd anomaly detection (slow; debugging)")
    max_nonfinite_steps: int = setting(20, "consecutive NaN/Inf losses before training stops")
    warmup_steps: int = setting(5, "steps per epoch left out of the FPS")
    max_steps_per_epoch: int | None = setting(None, "cap on steps per epoch (performance runs; None: no cap)")
    eval_every: int = setting(1, "epochs between validations")
    sample_every: int = setting(5, "epochs between sample grids")
    save_every_steps: int = setting(0, "also write last.pt every N steps inside an epoch (0: at epoch ends only)")
    log_every: int = setting(10, "steps between host syncs for logging and NaN checks")
    tensorboard: bool = setting(False, "also log to OUTPUT_DIR/tensorboard")
    threshold: float = setting(defaults.THRESHOLD, "probability threshold of the metrics")
    postprocess: str = setting("auto", "after training, choose the postprocessing (threshold, small regions, largest "
                                       "region, holes) on the validation split and report the test scores with "
                                       "and without it (auto), or not (none)", choices=("auto", "none"))
    int8: str = setting("off", "on: after the test scores, write OUTPUT_DIR/model.int8.onnx, the kept model with "
                               "int8 weights and activations, calibrated on training images and its masks checked "
                               "against float32's on validation images; on a CPU, predict, serve and evaluate run it "
                               "in the checkpoint's place when they agree on 999 pixels in 1,000, and where they do "
                               "not, OUTPUT_DIR/model.onnx, a float32 export that runs there on CPUs without "
                               "native bf16 (needs the export extra: pip install 'r2unet[export]')",
                        choices=("on", "off"))
    resume: bool = setting(False, "continue from OUTPUT_DIR/checkpoints/last.pt (its settings, unless given)")
    accept_split_change: bool = setting(False, "with --resume: go on although the data's split is not the one the run "
                                               "trained on (best.pt is then chosen anew on the new validation split)")
    no_memory_check: bool = setting(False, "train even when the memory estimate says a step does not fit (for "
                                           "this command only, never carried by --resume)")
    extra: dict = field(default_factory=dict)  # unknown keys of older configs, kept for the record

    def validate(self) -> TrainConfig:
        def bad(flag: str, msg: str):
            raise ConfigError(f"--{flag}: {msg}")

        if self.model_type not in list_models():
            bad("model_type", f"unknown model {quote(self.model_type)}; choose one of {', '.join(list_models())}")
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
        check_classes(self.num_classes)
        if self.output_ch not in (1, self.num_classes):  # the network's outputs follow the task (engine.task)
            bad("output_ch", f"must be 1 or --num_classes ({self.num_classes}), got {self.output_ch}; --num_classes K "
                "trains K classes")
        load_class_colors(self.class_colors, self.num_classes)  # a file or list that is not K colours is named
        if self.lr_batch_size is not None and self.lr_batch_size < 1:
            bad("lr_batch_size", f"must be >= 1, got {self.lr_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            bad("global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        if not 0 <= self.num_epochs_decay <= self.num_epochs:
            bad("num_epochs_decay", f"must be between 0 and --num_epochs ({self.num_epochs}), "
                f"got {self.num_epochs_decay}")
        if not 0 < self.lr < float("inf"):
            bad("lr", f"must be > 0 and finite, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, f"must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.augmentation_prob <= 1:
            bad("augmentation_prob", f"must be in [0, 1], got {self.augmentation_prob}")
        if not 0 < self.threshold < 1:
            bad("threshold", f"must be in (0, 1), got {self.threshold}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices and f.name != "model_type":
                bad(f.name, f"must be one of {', '.join(choices)}, got {quote(value)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", f"must be auto, cpu, cuda or cuda:N, got {quote(self.device)}")
        if self.num_workers < 0:
            bad("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.dist_timeout_s < 10:
            bad("dist_timeout_s", f"must be >= 10 seconds, got {self.dist_timeout_s}")
        if self.focal_gamma < 0:
            bad("focal_gamma", f"must be >= 0, got {self.focal_gamma}")
        for name in ("tversky_alpha", "tversky_beta"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.tversky_alpha + self.tversky_beta == 0:
            bad("tversky_beta", "--tversky_alpha and --tversky_beta cannot both be 0")
        if self.precise_bn < 0:
            bad("precise_bn", f"must be >= 0 (0: off), got {self.precise_bn}")
        if not 0 <= self.ema < 1:
            bad("ema", f"must be in [0, 1) (0: off; 0.9-0.999 typical), got {self.ema}")
        if self.warmup_steps < 0 or self.save_every_steps < 0:
            bad("warmup_steps" if self.warmup_steps < 0 else "save_every_steps", "must be >= 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            bad("max_steps_per_epoch", f"must be >= 1, got {self.max_steps_per_epoch}")
        if self.loss_scale != "dynamic":
            try:
                if float(self.loss_scale) <= 0:
                    raise ValueError
            except ValueError:
                bad("loss_scale_value", f"must be a positive number or 'dynamic', got {quote(self.loss_scale)}")
        return self

    def updated(self, **given) -> TrainConfig:
        """A new, validated config: these settings with ``given`` (a value None is not given). How a command
        (evaluate, predict, serve, export, bench) combines a checkpoint's settings with its flags."""
        return TrainConfig.from_dict({**self.to_dict(), **{k: v for k, v in given.items() if v is not None}}).validate()

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
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def read_config_file(path: str | Path) -> dict:
    """Settings from a YAML (.yaml/.yml), TOML (.toml) or JSON file, as a flat dict of TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file {path} not found")
    text = _text_of(path, "--config", "a config file is YAML, TOML or JSON text")
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
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig) if "help" in f.metadata}  # settings only
    unknown = sorted(quote(k) if not isinstance(k, str) else quote(k)[1:-1] for k in set(data) - set(types))
    if unknown:
        raise ConfigError(f"--config: unknown setting(s) in {path}: {', '.join(unknown[:10])}"
                          + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return {name: _typed(name, value, types[name], path) for name, value in data.items()}


def _text_of(path: Path, flag: str, what: str) -> str:
    """A settings file's text; a file that is not UTF-8 text (a binary file given by mistake) is named."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag}: {path} is not a text file (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8); {what}") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


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
                          + (" (or null)" if optional else "") + f", got {quote(value)}")
    return float(value) if base == "float" else str(value) if base == "str" else value


def load_class_colors(path: str | Path | None, num_classes: int) -> list[tuple[int, int, int]] | None:
    """The ``--class_colors`` file (or its list itself, as a run's config keeps it): a list of [r, g, b], one per
    class, the background's first."""
    if path is None:
        return None
    if num_classes < 2:  # a flag check: colours name the classes of label maps
        raise ConfigError("--class_colors: colours are for label maps (--num_classes K, K >= 2); binary masks have "
                          "none")
    import yaml  # JSON is YAML too

    inline = str(path).lstrip().startswith("[")
    text = path if inline else _text_of(Path(path), "--class_colors", "a JSON/YAML list of [r, g, b]")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--class_colors: cannot read {quote(path) if inline else path}: {exc}") from None
    if isinstance(values, dict) and "class_colors" in values:
        values = values["class_colors"]
    if not (isinstance(values, list) and len(values) == num_classes
            and all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                    for c in values)):
        raise ConfigError(f"--class_colors {quote(path) if inline else path}: must be a list of {num_classes} "
                          "[r, g, b] colours (0-255), one per class, the background's first")
    return [tuple(c) for c in values]



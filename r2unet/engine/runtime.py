"""Where and how the networks run: the device, the CPU's capabilities, the precision, the memory format,
compilation, library switches, synchronisation and the non-finite step guard.

Training, evaluation, inference and ``bench`` all ask this module, so a model runs the same way in each. The
functions take the few values they decide on, not a whole configuration.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import first_line
from .config import AMP_CHOICES, ConfigError

try:
    import resource  # process limits: POSIX only
except ImportError:
    resource = None


# ------------------------------------------------------------------------------------------------------------ device
def device_type(want: str) -> str:
    """"cuda" or "cpu": the kind of device ``--device`` asks for (``auto``: the GPU if there is one)."""
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if want.startswith("cuda") else "cpu"


def resolve_device(want: str = "auto", index: int | None = None, local_rank: int | None = None) -> torch.device:
    """``auto``: the GPU if there is one, else the CPU. ``cuda`` / ``cuda:N``: that GPU (``index``, the seed's
    ``--npu_idx``, wins over ``:N``; in a multi-process run ``local_rank`` picks it)."""
    if device_type(want) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but no CUDA GPU is available (use --device cpu)")
    if local_rank is not None:
        return torch.device("cuda", local_rank)
    if index is None:
        index = int(want.split(":")[1]) if ":" in want else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--npu_idx/--device: GPU {index} does not exist ({torch.cuda.device_count()} found)")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100)`` or ``cpu (AVX2 (no AVX-512, no native bf16), 2 threads)``: what a run's log names."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_info().label}, {torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators, from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: a GPU's OutOfMemoryError, or the CPU allocator's error (which
    is what a process limited by ``ulimit`` or a cgroup gets before the kernel would kill it)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    text = str(exc)
    return (oom is not None and isinstance(exc, oom)) or "can't allocate memory" in text \
        or "CUDA out of memory" in text


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing boundaries only; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------------- CPU
# oneDNN's instruction-set levels, lowest first (the values ONEDNN_MAX_CPU_ISA takes); bf16 matrix instructions
# start at AVX512_CORE_BF16. A limit below it makes oneDNN emulate bf16, as on a CPU without them.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL")


def available_memory() -> int | None:
    """Bytes of memory this process can take now without swapping or being killed, or None where unknown."""
    found = memory_available()
    return found[0] if found else None


def memory_available() -> tuple[int, str] | None:
    """(bytes, where the bound comes from) of the memory this process can take now: the least of the machine's
    MemAvailable, its cgroup's limit less what the cgroup holds (a container's, a batch job's), and its own
    RLIMIT_DATA / RLIMIT_AS less what it has mapped. None where none is known."""
    bounds = [b for b in (_meminfo_available(), _cgroup_room(), *_rlimit_room()) if b is not None]
    return min(bounds) if bounds else None


def _meminfo_available() -> tuple[int, str] | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available on this machine"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free on this machine"
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_room() -> tuple[int, str] | None:
    """Room left under this process's cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), its
    page cache that can be dropped counted as room. None: no limit (or none that can be read)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        mount = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
        for folder in (mount / path.lstrip("/"), mount):  # inside a container, its own cgroup is the mount's root
            limit = _read_int(folder / ("memory.max" if v2 else "memory.limit_in_bytes"))
            used = _read_int(folder / ("memory.current" if v2 else "memory.usage_in_bytes"))
            if limit is None or used is None:
                continue
            if limit >= 2**60:  # v1 writes "no limit" as a huge number
                break
            cache = 0
            try:
                key = "inactive_file" if v2 else "total_inactive_file"
                for row in (folder / "memory.stat").read_text().splitlines():
                    name, _, value = row.partition(" ")
                    if name == key:
                        cache = int(value)
            except (OSError, ValueError):
                pass
            return max(0, limit - used + cache), f"left under this cgroup's memory limit of {limit / 2**30:.1f} GB"
    return None


def _rlimit_room() -> list[tuple[int, str]]:
    """Room under this process's own limits (``ulimit -d``, ``ulimit -v``): the limit less what is mapped."""
    if resource is None:
        return []
    try:
        status = {k: int(v.split()[0]) * 1024 for k, _, v in
                  (row.partition(":") for row in Path("/proc/self/status").read_text().splitlines())
                  if k in ("VmData", "VmSize")}
    except (OSError, ValueError):
        return []
    room = []
    for name, kind, mapped in (("RLIMIT_DATA", "ulimit -d", "VmData"), ("RLIMIT_AS", "ulimit -v", "VmSize")):
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY and mapped in status:
            room.append((max(0, soft - status[mapped]), f"left under this process's limit ({kind}) of "
                                                        f"{soft / 2**30:.1f} GB"))
    return room


@dataclass(frozen=True)
class CpuInfo:
    """What this CPU can do, as the kernels PyTorch runs here see it."""

    vector_isa: str  # ATen's kernels: AVX512, AVX2, DEFAULT... (ATEN_CPU_CAPABILITY can lower it)
    amx: bool  # Advanced Matrix Extensions (native bf16 tiles)
    avx512_bf16: bool  # AVX-512 bf16 dot products
    onednn_limit: str | None  # ONEDNN_MAX_CPU_ISA when set: oneDNN (convolutions, matmuls) stays below it

    @property
    def native_bf16(self) -> bool:
        """bf16 convolutions and matmuls run on bf16 instructions (AMX or AVX512-BF16), not emulated."""
        if not (self.amx or self.avx512_bf16):
            return False
        limit = (self.onednn_limit or "ALL").upper()
        allowed = limit not in _ONEDNN_ISAS or _ONEDNN_ISAS.index(limit) >= _ONEDNN_ISAS.index("AVX512_CORE_BF16")
        return allowed and _onednn_bf16()

    @property
    def label(self) -> str:
        """The CPU class, as benchmarks/README.md names machines: AMX, AVX-512 BF16, AVX-512 or AVX2."""
        if self.native_bf16:
            return "AMX" if self.amx and self.vector_isa.startswith("AVX512") else "AVX-512 BF16"
        if self.vector_isa.startswith("AVX512"):
            return "AVX-512 (no native bf16)"
        if self.vector_isa == "AVX2":
            return "AVX2 (no AVX-512, no native bf16)"
        return f"{self.vector_isa} (no native bf16)"


def _onednn_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:  # a build without oneDNN
        return False


def _cpu_flag(name: str) -> bool:
    """A feature of this CPU: torch's own cpuinfo query where this torch has it, else /proc/cpuinfo (Linux)."""
    query = getattr(torch.cpu, f"_is_{name}_supported", None)
    if query is not None:
        try:
            return bool(query())
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return {"amx_tile": "amx_bf16", "avx512_bf16": "avx512_bf16"}[name] in flags


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    return CpuInfo(vector_isa=torch.backends.cpu.get_cpu_capability(), amx=_cpu_flag("amx_tile"),
                   avx512_bf16=_cpu_flag("avx512_bf16"), onednn_limit=os.environ.get("ONEDNN_MAX_CPU_ISA"))


# ------------------------------------------------------------------------------------------------------- precision
@dataclass
class Precision:
    """The autocast dtype on a device (None: float32)."""

    dtype: torch.dtype | None
    device: torch.device

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_amp(amp: str, device: torch.device) -> tuple[Precision, str | None]:
    """The precision that ``--amp`` asks for on ``device``, and a one-line note when the request is changed or
    costly (None otherwise).

    ``auto``: bf16 on GPUs that support it (else fp16); on a CPU, bf16 only where it is native (AMX / AVX512-BF16),
    float32 elsewhere, where bf16 is emulated and slower than float32 (measured with oneDNN limited to AVX2: a bf16
    convolution took 8x the float32 one). ``fp16`` (e.g. the seed's ``--apex 1``) on a CPU: fp16 kernels are emulated
    there, so it runs as bf16 where bf16 is native and as float32 elsewhere, with a note. An explicit ``bf16`` on a
    CPU without it runs as asked, with a warning."""
    cpu = device.type == "cpu"
    native = cpu_info().native_bf16 if cpu else None
    note = None
    if amp == "off":
        dtype = None
    elif amp == "fp16" and cpu:
        dtype = torch.bfloat16 if native else None
        runs = "bf16 natively, so the network runs in bf16" if native else \
            "float32 faster, so the network runs in float32"
        note = f"--amp fp16 (or --apex 1): fp16 is emulated on CPUs; this {cpu_info().label} CPU runs {runs}"
    elif amp == "fp16":
        dtype = torch.float16
    elif amp == "bf16":
        dtype = torch.bfloat16
        if cpu and not native:
            note = (f"warning: --amp bf16 on this {cpu_info().label} CPU is emulated and several times slower than "
                    "float32 (--amp auto picks float32 here)")
        elif not cpu and not torch.cuda.is_bf16_supported():
            note = "warning: --amp bf16 on a GPU without bf16 support is emulated and slow (--amp auto picks fp16)"
    elif amp == "auto":
        if cpu:
            dtype = torch.bfloat16 if native else None
        else:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        raise ValueError(f"--amp: must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return Precision(dtype, device), note


def resolve_channels_last(setting: str, precision: Precision, base_channels: int) -> bool:
    """``auto``: on for CUDA; on a CPU only with bf16 and base_channels >= 16, where oneDNN's blocked kernels win
    (R2U-Net t=2, batch 8 at 128 px on a 2-core AMX CPU: bf16 20 -> 31 img/s with channels_last at base 16, but
    58 -> 48 img/s at base 8; in float32 it did not pay off; numbers in benchmarks/README.md)."""
    if setting != "auto":
        return setting == "on"
    if precision.device.type == "cuda":
        return True
    return precision.dtype == torch.bfloat16 and base_channels >= 16


def resolve_compile(setting: str, device: torch.device) -> bool:
    """``auto``: compile on GPUs only (on CPUs inductor's code was slower than eager bf16; benchmarks/README.md).
    Training's default is ``off``: on an H200 every compiled bf16/fp32 run validated worse than its eager pair."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class Placement:
    """How a model runs on a device, decided once from the settings (``placement``): its ``precision`` (and the
    ``note`` said about it, or None), ``channels_last`` and whether training compiles it (``compile``)."""

    device: torch.device
    precision: Precision
    note: str | None
    channels_last: bool
    compile: bool


def placement(cfg, device: torch.device) -> Placement:
    """``cfg``'s amp, channels_last and compile settings resolved for ``device`` (the rules of ``resolve_amp``,
    ``resolve_channels_last`` and ``resolve_compile``): what train, evaluate, predict, serve and bench run with."""
    precision, note = resolve_amp(cfg.amp, device)
    return Placement(device, precision, note, resolve_channels_last(cfg.channels_last, precision, cfg.base_channels),
                     resolve_compile(cfg.compile, device))


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """Library switches of a training run (``train`` and ``bench train``'s default row): on GPUs cuDNN picks the
    fastest convolution algorithm for each shape and float32 work may use TF32; ``deterministic`` trades both for
    reproducibility."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def peak_tflops(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None) -> tuple[float, str]:
    """A large (``n`` x ``n``) matmul's rate on ``device`` in ``dtype``, by default the precision it runs natively
    (bf16 on GPUs and bf16-native CPUs, float32 on other CPUs: an emulated bf16 peak would be a meaningless bound),
    and that precision's name. About a second on a CPU."""
    native_bf16 = device.type == "cuda" or cpu_info().native_bf16
    dtype = dtype or (torch.bfloat16 if native_bf16 else torch.float32)
    native_bf16 = dtype == torch.bfloat16
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < (0.2 if device.type == "cuda" else 0.5):
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, "bf16" if native_bf16 else "fp32"


# ------------------------------------------------------------------------------------------------------ compilation
class CompileWithFallback(nn.Module):
    """``torch.compile`` of a module that falls back to eager mode, once and for good, if compilation fails.

    Compilation happens lazily at the first call (the backward graph at the first ``backward()``, see
    ``backward_failed``), so failures (a missing compiler toolchain, an unsupported operation on an old torch, a
    kernel that does not build) surface there; they are logged and the step is redone eagerly. Errors after a
    successful first forward and backward are real errors and propagate."""

    def __init__(self, module: nn.Module, log=print, mode: str = "default"):
        super().__init__()
        self.module = module
        self._log, self._ok, self._backward_ok = log, None, False
        try:  # torch.compile itself refuses some setups (e.g. a Python version dynamo does not support yet)
            compiled = torch.compile(module, mode=None if mode == "default" else mode)
        except Exception as exc:  # noqa: BLE001
            compiled = None
            self._fall_back(exc)
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: no duplicate state

    def _fall_back(self, exc: Exception) -> None:
        self._ok = False
        self._log(f"torch.compile failed ({type(exc).__name__}: {first_line(exc, 200)}); continuing in eager mode "
                  "(use --compile off to skip compilation)")

    def backward_failed(self, exc: Exception) -> bool:
        """A backward through the compiled graph raised: before the first backward has succeeded, that is a
        compilation failure, so fall back to eager and return True (redo the step); afterwards, False (re-raise)."""
        if self._ok is False or self._backward_ok:
            return False
        self._fall_back(exc)
        return True

    def backward_succeeded(self) -> None:
        self._backward_ok = True

    @property
    def fell_back(self) -> bool:
        """Compilation failed and the module runs eagerly."""
        return self._ok is False

    def forward(self, *args, **kwargs):
        if self._ok is False:
            return self.module(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; re-raised below once compile worked
            if self._ok:
                raise
            self._fall_back(exc)
            return self.module(*args, **kwargs)
        self._ok = True
        return out


# ------------------------------------------------------------------------------------------------ non-finite steps
@torch.no_grad()
def skip_nonfinite_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor,
                        unit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``optimizer.step()`` unless a gradient is NaN/Inf, decided on the device (no host synchronisation).

    One fused pass flags non-finite gradients in ``found_inf`` (the check ``GradScaler`` uses, with a scale of 1);
    the fused Adam kernel then skips the whole update, moments and step count included, when the flag is set: one
    bad batch cannot poison the weights (bf16/fp32; fp16 steps go through the GradScaler, which does the same).
    ``unit_scale``: a 1.0 on the device (the check's "unscale" factor), to reuse across steps.
    Returns a device bool: the step was taken."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    found_inf.zero_()
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, found_inf, unit_scale if unit_scale is not None else torch.ones_like(found_inf))
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not found_inf.item():  # optimisers without the fused kernel's found_inf: decided on the host
        optimizer.step()
    return found_inf == 0

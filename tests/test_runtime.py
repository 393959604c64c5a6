"""The device and precision policy (r2unet/engine/runtime.py): chosen by what this CPU can do, never by what the
machine a test was written on could do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r2unet.engine import runtime
from r2unet.engine.runtime import CpuInfo, resolve_amp, resolve_channels_last

CPU = torch.device("cpu")
AVX2 = CpuInfo(vector_isa="AVX2", amx=False, avx512_bf16=False, onednn_limit=None)


def test_cpu_classes_are_named_by_capability():
    assert AVX2.native_bf16 is False and AVX2.label.startswith("AVX2")
    # a CPU with bf16 units whose oneDNN is limited below them (ONEDNN_MAX_CPU_ISA) computes bf16 emulated
    limited = CpuInfo(vector_isa="AVX512", amx=True, avx512_bf16=True, onednn_limit="AVX2")
    assert limited.native_bf16 is False and limited.label.startswith("AVX-512 (no native bf16)")


def test_this_machines_cpu_is_read_from_its_flags():
    info = runtime.cpu_info()
    assert info.vector_isa == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").exists() and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        flags = Path("/proc/cpuinfo").read_text()
        assert info.native_bf16 == ("amx_bf16" in flags or "avx512_bf16" in flags)


@pytest.mark.parametrize("amp,native,dtype,note", [
    ("auto", True, torch.bfloat16, None),
    ("auto", False, None, None),
    ("off", True, None, None),
    ("bf16", True, torch.bfloat16, None),
    ("bf16", False, torch.bfloat16, "emulated and several times slower"),
    ("fp16", True, torch.bfloat16, "the network runs in bf16"),
    ("fp16", False, None, "the network runs in float32"),
])
def test_cpu_precision_follows_what_the_cpu_runs_natively(cpu_like, amp, native, dtype, note):
    cpu_like("AMX" if native else "AVX2")
    precision, said = resolve_amp(amp, CPU)
    assert precision.dtype == dtype
    assert (said is None) if note is None else (note in said and ("AVX2" in said) != native)


def test_unknown_amp_is_named():
    with pytest.raises(ValueError, match="--amp"):
        resolve_amp("fp8", CPU)


def test_channels_last_on_cpus_only_with_bf16_and_wide_networks(cpu_like):
    for kind, base, expected in (("AMX", 16, True), ("AMX", 8, False), ("AVX2", 16, False), ("AVX2", 64, False)):
        cpu_like(kind)
        assert resolve_channels_last("auto", resolve_amp("auto", CPU)[0], base) is expected
    assert resolve_channels_last("on", resolve_amp("off", CPU)[0], 8) is True


def test_a_limited_onednn_is_seen_as_no_native_bf16_in_a_real_process():
    """ONEDNN_MAX_CPU_ISA=AVX2 (how an AVX2-only CPU is imitated on a bigger one) makes auto pick float32."""
    code = ("from r2unet.engine.runtime import cpu_info, resolve_amp; import torch; "
            "print(cpu_info().native_bf16, resolve_amp('auto', torch.device('cpu'))[0].name)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "fp32"]


def test_the_flop_bound_uses_the_precision_the_cpu_runs_natively(cpu_like):
    for kind, expected in (("AVX2", "fp32"), ("AMX", "bf16")):
        cpu_like(kind)
        tflops, dtype = runtime.peak_tflops(CPU)
        assert dtype == expected and tflops > 0

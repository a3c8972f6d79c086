"""Which int8 kernels this CPU gives onnxruntime, from /proc/cpuinfo (no CPU assumed).

int8 speed depends on it: onnxruntime's int8 convolutions use AMX or VNNI dot-product
instructions where the CPU has them and AVX2 multiply-adds otherwise. Measured with
benchmarks/inference.py (full model, 256x256, batch 1): int8 4.1x torch fp32 on an
AVX512-VNNI CPU, 2.3x on an AVX2-only one (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path

from brainseg.inference.runtimes import CPUINFO, cpu_flags

#: (flag, name, what to expect) in order of preference; x86 flags, then Arm features.
_PATHS = (
    ("amx_int8", "AMX-INT8", "VNNI-class or better: about 4x torch fp32 at batch 1"),
    ("avx512_vnni", "AVX512-VNNI", "about 4x torch fp32 at batch 1 (measured 4.1x)"),
    ("avx_vnni", "AVX-VNNI", "VNNI: about 4x torch fp32 at batch 1 (4.1x on AVX512-VNNI)"),
    ("avx2", "AVX2 (no VNNI)", "about 2.3x torch fp32 at batch 1 (measured 2.3x)"),
    ("i8mm", "Arm I8MM", "not measured by brainseg; run benchmarks/inference.py"),
    ("asimddp", "Arm dot product (SDOT)", "not measured by brainseg; run benchmarks/inference.py"),
)


def int8_path(cpuinfo: Path = CPUINFO) -> dict[str, str]:
    """``{"name": ..., "expect": ...}``: this CPU's int8 instruction path and its speed-up."""
    flags = cpu_flags(cpuinfo)
    if not flags:
        return {"name": "unknown", "expect": f"no CPU flags readable from {cpuinfo}"}
    for flag, name, expect in _PATHS:
        if flag in flags:
            return {"name": name, "expect": expect}
    return {"name": "no AVX2", "expect": "int8 may be no faster than fp32 on this CPU"}

"""Which device and which matmul precision a step runs on: the one copy of "auto" resolution."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cpu", "cuda" and "cuda:<n>" as given (CUDA must exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda[:n]") from e
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda[:n]")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX.

    Elsewhere bfloat16 matmuls are emulated and slower than float32, so "auto" precision keeps float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's capability checks
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_matmul_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The matmul dtype `precision` means on `device` ("auto": bfloat16 where native, else float32)."""
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision {precision!r} is not one of auto, float32, bfloat16")
    return getattr(torch, precision)


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32: how precisions are written in provenance and MLflow."""
    return str(dtype).removeprefix("torch.")


def flush_denormals() -> None:
    """Treat denormal floats as zero on CPU: decayed probe weights otherwise slow CPU arithmetic ~1.5x (measured).

    Call it first thing in a process (our flows, CLI and benchmarks do): worker threads inherit the setting only
    when they are created after it, and changing it inside a library call would surprise the caller.
    """
    torch.set_flush_denormal(True)

"""Which precision a device computes in: `train.mixed_precision: auto`, and lit-sample's and
lit-eval's `--precision auto`, pick bf16 only where the device computes it natively, because
emulated bf16 is slower than fp32 (measured 2026-11-26, the demo's training step on one core of a
Zen 4 CPU: native 380 ms against 681 ms fp32; the same CPU with oneDNN capped to AVX2 5,224 ms
against 789 ms fp32, and to AVX-512 without BF16 1,081 against 724 ms)."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")  # the sampler's and the evaluator's choices


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX (torch's own CPU feature probes; an older torch without them reads False)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(setting: str, device: torch.device, fallback: str = "no") -> str:
    """A precision setting as it runs here: `auto` becomes bf16 where the device computes it natively, else
    `fallback` (accelerate's "no" for train.mixed_precision); the rest pass through."""
    return ("bf16" if native_bf16(device) else fallback) if setting == "auto" else setting


def sampling_precision(precision: str, device: torch.device) -> str:
    """--precision as it runs here: `auto` becomes bf16 where the device computes it natively, else fp32."""
    if precision not in PRECISIONS:  # e.g. the trainer's "no" or "fp16": never silently bf16
        raise ValueError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    return resolve_precision(precision, device, "fp32")


def autocast(device: torch.device, precision: str):
    """bf16 autocast for a precision that runs as bf16 here, none for fp32 (the models keep their
    recurrent state in fp32 either way)."""
    if sampling_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    # no cast cache: a CUDA graph must not capture casts cached outside it
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)

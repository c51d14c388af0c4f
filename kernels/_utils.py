"""Small helpers shared by the Triton launchers (host side only; nothing runs at import)."""

from __future__ import annotations

import functools

import torch
import triton

from kernels import interpreting


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"the triton kernels need CUDA tensors, got a tensor on {t.device}; "
                "use kernels='torch' on a CPU (or set TRITON_INTERPRET=1 to run Triton's interpreter)"
            )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_hint(device: torch.device) -> int:
    """A persistent-grid size: a few programs per SM on a GPU, a handful in the interpreter."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is unit-stride (what the kernels index), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) as a 2-D (rows, N) tensor with unit last stride, copying only when it must."""
    x = unit_last_stride(x)
    return x.reshape(-1, x.shape[-1])


def pow2_at_least(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def compile_case(
    module: str,
    kernel: str,
    constexprs: dict,
    pointers: dict,
    *,
    warps: int = 4,
    stages: int = 2,
    label: str = "",
    **extra,
) -> dict:
    """One configuration for ``python -m kernels.compile_check``, declared beside its kernel:
    ``pointers`` maps every pointer argument to its element type ("bf16", "fp32", "i64", ...);
    ``floats`` (in extra) names the fp32 scalars; every other runtime argument is an i32."""
    return dict(
        module=module,
        kernel=kernel,
        constexprs=constexprs,
        pointers=pointers,
        num_warps=warps,
        num_stages=stages,
        label=label,
        dtype=extra.pop("dtype", next(iter(pointers.values()))),
        **extra,
    )

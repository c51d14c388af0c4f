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


def blocks_per_sm(
    regs_per_thread: int,
    shared_bytes: int,
    num_warps: int,
    regs_per_sm: int = 65536,
    shared_per_sm: int = 233_472,
    max_warps: int = 64,
    max_blocks: int = 32,
) -> int:
    """Resident blocks per SM of a compiled kernel (CUDA's occupancy rule, Hopper's limits by
    default): registers are allocated per warp in units of 256 (8 per thread), shared memory per
    block, at most 64 warps and 32 blocks an SM. 163 registers x 4 warps: 168 x 32 = 5376 per warp,
    12 warps fit 65,536, so 3 blocks."""
    per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // per_warp) // num_warps
    by_shared = shared_per_sm // shared_bytes if shared_bytes else max_blocks
    return max(1, min(by_regs, by_shared, max_warps // num_warps, max_blocks))


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


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

"""``python -m bench.op_count``: the ops one training step dispatches, per backend.

A step (forward under autocast, backward, gradient clipping, AdamW) is recorded with a
``TorchDispatchMode``; ops that only make views or metadata are left out, so what remains is a
proxy for kernel launches that needs no GPU (our kernels run in Triton's interpreter on a CPU). A
custom op counts once though attention's backward launches three kernels, and a foreach op once
though it launches one kernel per chunk of tensors. The count depends on the model's structure
(layers, ablations), not its widths, so the preset's model is shrunk to tiny widths.

    python -m bench.op_count --preset tinystories [--kernels torch triton] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import sys

import torch

from kernels import BACKENDS

# Ops that launch no work: views, metadata, allocation, and the CPU-only token-range check.
NO_WORK = frozenset(
    {
        "aten::t",
        "aten::view",
        "aten::detach",
        "aten::transpose.int",
        "aten::_unsafe_view",
        "aten::empty.memory_format",
        "aten::empty_strided",
        "aten::set_.source_Storage",
        "aten::set_.source_Storage_storage_offset",
        "aten::new_empty",
        "aten::unsqueeze",
        "aten::lift_fresh",
        "aten::alias",
        "aten::as_strided",
        "aten::expand",
        "aten::slice.Tensor",
        "aten::select.int",
        "aten::unbind.int",
        "aten::split.Tensor",
        "aten::split_with_sizes",
        "aten::reshape",
        "aten::_local_scalar_dense",
        "aten::min",
        "aten::max",
    }
)


def _inside_interpreter() -> bool:
    """Whether the op was dispatched by Triton's interpreter itself (it copies a kernel's arguments
    back after running it, an ``aten::copy_`` per argument): no such op runs on a GPU."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.endswith(os.path.join("triton", "runtime", "interpreter.py")):
            return True
        f = f.f_back
    return False


@contextlib.contextmanager
def dispatched_ops(keep=None):
    """Record the ops dispatched inside the block: yields a list that fills with their names
    (``aten::mm``, ``fastlm::rms_norm_fwd``...), in order, views included; ``keep(func, args,
    kwargs)`` chooses which to record. What the op count, and tests of what a step runs, rest on."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if keep is None or keep(func, args, kwargs):
                names.append(func.name())
            return func(*args, **kwargs)

    with Record():
        yield names


def count_step_ops(model_cfg, kernels: str, batch_size: int = 2, context: int = 32) -> collections.Counter:
    """Ops (by name) that launch work in one training step, counted on the second step (the first
    builds caches, e.g. the fused optimizer's tables)."""
    from model import TransformerLM
    from train.optimizer import AdamW, clip_and_step

    torch.manual_seed(0)
    model = TransformerLM(model_cfg, kernels=kernels)
    opt = AdamW(model.parameters(), lr=1e-3, fused=kernels == "triton")
    x = torch.randint(0, model_cfg.vocab_size, (batch_size, context))
    for _ in range(2):
        with dispatched_ops(lambda *_: not _inside_interpreter()) as calls:
            # fp16: the interpreter's bf16 dot is wrong; the op sequence is the same as bf16's.
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(x, targets=x)
            loss.backward()
            clip_and_step(opt, 1.0)
            opt.zero_grad(set_to_none=True)
    return collections.Counter(c for c in calls if c not in NO_WORK and not c.startswith("profiler::"))


def tiny_model(preset_name: str):
    """The preset's model structure (layers, heads, ablations) at tiny widths."""
    from train.config import preset

    cfg, _ = preset(preset_name)
    return dataclasses.replace(cfg, vocab_size=101, context_length=32, d_model=16 * cfg.num_heads, d_ff=48)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.op_count", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tinystories")
    p.add_argument("--kernels", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--top", type=int, default=10, help="most frequent ops to list per backend")
    args = p.parse_args(argv)
    # The count runs on the CPU, our kernels through the interpreter (read when they are first
    # imported, so before the model is), on a GPU machine too.
    os.environ["TRITON_INTERPRET"] = "1"
    cfg = tiny_model(args.preset)
    print(
        f"{args.preset}: {cfg.num_layers} layers, {cfg.num_heads} heads (widths shrunk; the count depends on structure)"
    )
    for k in args.kernels:
        ops = count_step_ops(cfg, k)
        foreach = sum(n for name, n in ops.items() if name.startswith("aten::_foreach"))
        print(f"\n{k}: {sum(ops.values())} ops a step ({foreach} foreach)")
        for name, n in ops.most_common(args.top):
            print(f"  {n:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

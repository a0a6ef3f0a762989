"""FLOPs a call performs in its matrix products, and the machine's dense matmul FLOP/s.

Counting uses torch's FlopCounterMode (mm, addmm, bmm, convolutions, attention kernels:
2 FLOPs per multiply-add), extended with the CPU fused-attention kernels it does not
know (`_scaled_dot_product_flash_attention_for_cpu` and its backward), which timm's
Attention calls on CPU. Elementwise work (norms, GELU, adaLN modulation) is not counted:
the fraction of peak is "useful matmul FLOPs per second", as MFU is usually defined.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_flash_forward(query, key, value, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def count_flops(call: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of one call of `call`, counted from its matmuls."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS) as counter:
        call()
    per_op = {str(op): int(flops) for op, flops in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument's layout, without its values: what a replay re-creates."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class MatmulCall:
    """One call of an op count_flops counts, with its tensor arguments as TensorSpecs."""

    op: Any
    args: tuple
    kwargs: dict


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype)
    return value


class _MatmulRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[MatmulCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in flop_registry or packet in CPU_ATTENTION_FORMULAS:
            self.calls.append(MatmulCall(func, tree_map(_spec, args), tree_map(_spec, kwargs)))
        return func(*args, **kwargs)


def record_matmuls(call: Callable[[], Any]) -> list[MatmulCall]:
    """The counted ops (matmuls, attention kernels) one call of `call` dispatches, in order. Like
    count_flops, a torch dispatch mode: the teacher's forward then runs inline (teacher_thread.py)."""
    with _MatmulRecorder() as recorder:
        call()
    return recorder.calls


def replay_seconds(calls: list[MatmulCall], repeats: int = 3) -> float:
    """Best-of-`repeats` time of running `calls` back to back on inputs of the recorded shapes,
    strides and dtypes: what the step's matmuls cost with nothing else in between. Inputs are made
    once per distinct layout and reused (warmer caches than a step's fresh activations: a bound)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    generator = torch.Generator().manual_seed(0)
    made: dict[TensorSpec, torch.Tensor] = {}

    def make(value: Any) -> Any:
        if not isinstance(value, TensorSpec):
            return value
        if value not in made:
            size = 1 + sum((n - 1) * st for n, st in zip(value.shape, value.stride)) if all(value.shape) else 0
            storage = torch.randn(size, generator=generator).to(value.dtype)
            made[value] = storage.as_strided(value.shape, value.stride)
        return made[value]

    ready = [(call.op, tree_map(make, call.args), tree_map(make, call.kwargs)) for call in calls]

    def run() -> None:
        for op, args, kwargs in ready:
            op(*args, **kwargs)

    run()  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def dense_matmul_flops_per_s(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-`repeats` FLOP/s of a square (size x size) @ (size x size) product, in this process
    with its current thread setting: the dense-compute ceiling a training step is compared to."""
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got {size}, {repeats}")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator, dtype=torch.float32).to(dtype)
    b = torch.randn(size, size, generator=generator, dtype=torch.float32).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best

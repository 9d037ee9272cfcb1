"""Peak bytes of live tensors during one training step on the CPU: what the memory estimate predicts.

Process RSS holds the interpreter, libraries and allocator caches; the estimator predicts tensors. This
measures tensors: the bytes live when the step starts (weights with every quantization statistic, adapters,
gradients, optimizer state, buffers; each storage counted once) plus the peak of the running total of
every allocation and free torch's profiler records during the step (``profile_memory=True``: one event per
allocation with its size, in order).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

GIB = 2**30


def _tensors_of_quant_state(state) -> Iterable[Any]:
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if t is not None and hasattr(t, "untyped_storage"):
            yield t
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _tensors_of_quant_state(nested)


def live_tensors(model, optimizer=None) -> list[Any]:
    """Every tensor a training step starts with: parameters (and their quantization state), buffers,
    gradients, optimizer state."""
    out: list[Any] = []
    for p in model.parameters():
        out.append(_local(p))
        if p.grad is not None:
            out.append(_local(p.grad))
        state = getattr(p, "quant_state", None)
        if state is not None:
            out.extend(_tensors_of_quant_state(state))
    for m in model.modules():  # FSDP2 replaces a 4-bit weight by its shard; the layer keeps the quant state
        state = getattr(m, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            out.extend(_tensors_of_quant_state(state))
    out.extend(model.buffers())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the real optimizer
    for st in getattr(inner, "state", {}).values():
        out.extend(_local(t) for t in (st.values() if isinstance(st, dict) else []) if hasattr(t, "untyped_storage"))
    return out


def _local(t):
    """This process's part of a tensor: the local shard of a DTensor (FSDP2), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.device.type == "meta":
            continue
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def allocation_peak(prof, device: str = "cpu") -> tuple[int, int, dict[str, int]]:
    """(peak, end, live at the peak by allocating op) of the running total of allocations minus frees on
    ``device`` during a profile, in bytes."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, int, str]] = []
    stack = [(n, "") for n in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, op = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, op))
        stack.extend((c, node.name if node.tag == _EventType.TorchOp else op) for c in node.children)
    running = peak = 0
    live: dict[int, tuple[int, str]] = {}
    at_peak: dict[int, tuple[int, str]] = {}
    for _, size, ptr, op in sorted(events):
        running += size
        if size > 0:
            live[ptr] = (size, op)
        else:
            live.pop(ptr, None)
        if running > peak:
            peak, at_peak = running, dict(live)
    by_op: dict[str, int] = {}
    for size, op in at_peak.values():
        by_op[op or "(outside an op)"] = by_op.get(op or "(outside an op)", 0) + size
    return peak, running, dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


class TensorPeak:
    """``start(model, optimizer)`` before a step, ``stop()`` after it: ``peak_bytes`` of live tensors."""

    def __init__(self):
        self.prof = None
        self.start_bytes = 0
        self.peak_bytes: int | None = None
        self.by_op: dict[str, int] = {}  # bytes allocated during the step and live at its peak, by op

    def start(self, model, optimizer=None) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.start_bytes = storage_bytes(live_tensors(model, optimizer))
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def stop(self) -> int | None:
        if self.prof is None:
            return None
        self.prof.__exit__(None, None, None)
        peak, _, self.by_op = allocation_peak(self.prof)
        self.prof = None
        self.peak_bytes = self.start_bytes + peak
        return self.peak_bytes

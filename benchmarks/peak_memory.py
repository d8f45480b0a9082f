"""Peak tensor memory of a call, shared by benchmarks that run in our venv and in peers' venvs (torch only)."""

from __future__ import annotations


def peak_bytes(fn) -> tuple[object, int]:
    """Run fn(); return its result and the peak of bytes allocated above the start (tensors freed during
    the call included), from the CPU profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    now = peak = 0
    for e in events:
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    return out, peak


def make_resident(model) -> None:
    """Read every weight once, so a lazily mapped checkpoint is in RSS *before* a baseline is taken: otherwise
    the model's own pages, touched for the first time by the measured run, count as that run's memory."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()

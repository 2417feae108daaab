"""Per-job random streams: each job's dropout draws from its own state, swapped in only while it computes.

A state is one uint8 tensor: the CPU generator's state, followed by the CUDA device's when the job
trains there. Swapping states in and out (instead of reseeding) makes a job's draws independent of
whatever else ran in between, so a fine-tune trained beside others ends where it would alone.
"""

from __future__ import annotations

import torch


def new_rng(seed: int, device: torch.device) -> torch.Tensor:
    """A fresh state seeded with ``seed`` (the CPU's, plus ``device``'s when it is a CUDA device)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        if device.type == "cuda":
            state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


def swap_rng(state: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Install ``state`` (CPU, plus ``device``'s on CUDA); return the state it replaced, in the same layout."""
    cpu_size = torch.get_rng_state().numel()
    previous = torch.get_rng_state()
    if device.type == "cuda":
        previous = torch.cat([previous, torch.cuda.get_rng_state(device)])
        if state.numel() > cpu_size:
            torch.cuda.set_rng_state(state[cpu_size:].clone(), device)
    torch.set_rng_state(state[:cpu_size].clone())  # a copy: a view into a bigger tensor crashes it
    return previous


def forked_rng():
    """``torch.random.fork_rng`` over the CPU and every CUDA device: seeding inside (``manual_seed`` seeds CUDA
    too) leaves the caller's streams as they were."""
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else [])

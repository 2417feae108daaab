"""Activation checkpoints off the device: what a checkpointed step keeps for backward, held in pinned host memory.

With gradient checkpointing (``job.checkpoint_activations``), a step keeps for backward little more than each
decoder layer's input: layers x tokens x hidden values, on the GPU from the forward until the backward reaches that
layer. Under ``offloaded_activations(device)`` each such tensor goes to a pinned host buffer instead and comes back
when the backward needs it:

- forward (the pack hook of ``torch.autograd.graph.saved_tensors_hooks``): the copy to the host runs on a side CUDA
  stream once the work queued so far on the compute stream is done (``wait_stream``), while the forward goes on;
  the tensor's memory is marked in use by the side stream (``record_stream``), so the allocator hands it out again
  only after the copy.
- backward (the unpack hook): the copy back goes to a buffer allocated on the compute stream, runs on the side
  stream, and the compute stream waits for its event before any use. Each unpack also starts bringing back the
  tensor packed just before it, which a backward in reverse layer order needs next: that copy overlaps compute.

Exact by construction: the same bytes come back, with the same shape, strides and dtype, so the backward runs the
same kernels on the same values. Only saved tensors on ``device``, contiguous, of plain ``torch.Tensor`` type and
at least ``min_bytes`` move (parameters, and the small masks and positions, stay). Under gradient checkpointing the
hooks see the layers' inputs (what each checkpoint saves) and what is saved outside checkpointed layers; inside a
checkpointed layer checkpointing's own hooks apply (the innermost hooks win).

On the CPU (or any device other than CUDA) it is a no-op: the tensors already live in host memory, and
``offloaded_activations`` returns a context that installs nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Protocol

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

MIN_BYTES = 1 << 20  # smaller tensors (masks, positions, norms' statistics) are not worth a copy


class Copies(Protocol):
    """How saved tensors travel: to a host buffer and back, on some stream, with something to wait for."""

    device: torch.device

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, object]: ...

    def wait(self, done: object) -> None: ...


class CudaCopies:
    """Copies between a CUDA device and pinned host memory on one side stream, overlapping the compute stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pinned host copy of ``tensor``, under way on the side stream (the copy back waits for it: same stream)."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the work that makes ``tensor`` is queued
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is reused only after the copy
        return host

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """A device copy of ``host`` under way on the side stream, and the event that marks it done."""
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)  # the compute stream's memory:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # free only after the work queued so far
        with torch.cuda.stream(self.stream):
            out.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    def wait(self, done: torch.cuda.Event) -> None:
        """Make the compute stream wait for a copy back before it uses the tensor."""
        torch.cuda.current_stream(self.device).wait_event(done)


class Offloaded:
    """One saved tensor held on the host: its buffer, its copy back when under way, and the tensor packed before it
    (the one a backward in reverse order needs next)."""

    __slots__ = ("host", "pending", "previous", "__weakref__")

    def __init__(self, host: torch.Tensor, previous: weakref.ref | None):
        self.host, self.pending, self.previous = host, None, previous

    def fetch(self, copies: Copies) -> None:
        """Start the copy back unless it is under way."""
        if self.pending is None:
            self.pending = copies.to_device(self.host)

    def take(self, copies: Copies) -> torch.Tensor:
        """The tensor back on the device, ready for the compute stream (the host buffer stays: retain_graph)."""
        self.fetch(copies)
        tensor, done = self.pending
        self.pending = None
        copies.wait(done)
        return tensor


class ActivationOffload(saved_tensors_hooks):
    """Saved-tensor hooks that hold the tensors saved on ``copies.device`` on the host until backward needs them.

    Args:
        copies: how tensors travel (``CudaCopies`` on a CUDA device).
        min_bytes: smaller tensors stay where they are.
    """

    def __init__(self, copies: Copies, min_bytes: int = MIN_BYTES):
        self.copies, self.min_bytes = copies, min_bytes
        self._last: weakref.ref | None = None
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | Offloaded:
        if not self._moves(tensor):
            return tensor.detach()  # detached: the graph must not hold a reference to its own output
        record = Offloaded(self.copies.to_host(tensor), self._last)
        self._last = weakref.ref(record)
        return record

    def _unpack(self, packed: torch.Tensor | Offloaded) -> torch.Tensor:
        if not isinstance(packed, Offloaded):
            return packed
        packed.fetch(self.copies)
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None:
            previous.fetch(self.copies)  # needed next: its copy overlaps this tensor's backward
        return packed.take(self.copies)

    def _moves(self, tensor: torch.Tensor) -> bool:
        return (
            type(tensor) is torch.Tensor
            and not isinstance(tensor, nn.Parameter)
            and tensor.device == self.copies.device
            and tensor.layout == torch.strided
            and tensor.is_contiguous()
            and tensor.numel() * tensor.element_size() >= self.min_bytes
        )


def offloaded_activations(
    device: torch.device | str, *, min_bytes: int = MIN_BYTES
) -> contextlib.AbstractContextManager:
    """A context under which the tensors a forward saves for backward wait in pinned host memory (CUDA only).

    Use one per forward pass, around the forward (the backward may run outside it)::

        with offloaded_activations(device):
            loss = causal_lm_loss(finetune, **batch)
        loss.backward()

    Args:
        device: where the model computes. Anything but a CUDA device gives a context that does nothing.
        min_bytes: saved tensors smaller than this stay on the device.

    Returns:
        The context manager: ``ActivationOffload`` hooks on CUDA, ``contextlib.nullcontext()`` elsewhere.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ActivationOffload(CudaCopies(device), min_bytes)

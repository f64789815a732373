"""Which implementation of LAVO runs a call: the backends and the ``auto`` policy.

- ``torch``: the plain PyTorch path, vectorised over the whole sequence (every pattern, padding
  masks, decoding's parallel twin).
- ``chunked``: causal self-attention chunk by chunk with a hand-written backward, both memories
  (``chunked.py``: ``memory="kv"``; ``chunked_input.py``: ``memory="input"``); linear in time
  and memory in practice on a CPU, not only on paper.
- ``compile``: the plain path under ``torch.compile`` (inductor), with dynamic lengths.
- ``triton``: the fused kernels of ``triton_kernels.py`` (``memory="kv"``) and ``triton_input.py``
  (``memory="input"``): CUDA; the CPU only in Triton's interpreter.
- ``auto``: per device, the fastest backend *verified there* that supports the call
  (:data:`VERIFIED`), falling back to ``torch``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch

Backend = Literal["auto", "torch", "chunked", "compile", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "chunked", "compile", "triton")

VERIFIED: dict[str, tuple[str, ...]] = {
    # Measured on the 2-core CPU machine (docs/efficiency.md, docs/lavo.md): the chunked pass is
    # the fastest there for causal self-attention, both memories; the plain path for the rest.
    "cpu": ("chunked", "torch"),
    # No GPU has run this project's tests yet: the plain path is the only backend whose
    # operations are all stock PyTorch. `tox -e gpu` verifies the others (UNVERIFIED_ON_CUDA);
    # promote them here once it has passed on a GPU.
    "cuda": ("torch",),
}
"""Per device type, the backends ``auto`` may choose, fastest first."""

UNVERIFIED_ON_CUDA: dict[str, str] = {
    "triton": "the kernels of both memories (triton_kernels.py: memory='kv'; triton_input.py: "
              "memory='input') pass under Triton's interpreter and compile for sm_90 "
              "(memory='kv'), but have not run on a GPU",
    "chunked": "stock PyTorch, tested on the CPU only; a Python loop over chunks, likely slower "
               "than the kernels on a GPU",
    "compile": "inductor's CPU code is tested; its GPU (Triton) code has not run",
}
"""The backends ``auto`` must not choose on CUDA until ``tox -e gpu`` has passed on a GPU, and
what is missing for each; ``VERIFIED["cuda"]`` lists none of them."""


def chunked_unsupported(*, causal: bool, cross: bool, masked: bool, empty: bool) -> str | None:
    """Why the chunked pass cannot run a call, or None when it can."""
    if cross:
        return "cross attention"
    if not causal:
        return "non-causal attention (the chunked pass carries causal running sums)"
    if masked:
        return "a key_padding_mask"
    if empty:
        return "an empty sequence"
    return None


def choose(requested: str, device: torch.device, reasons: dict[str, str | None]) -> str:
    """The backend that runs a call.

    Args:
        requested: the configured backend (one of :data:`BACKENDS`).
        device: the device of the call's tensors.
        reasons: for each backend with limits, why it cannot run this call (None: it can).

    Raises:
        ValueError: an explicitly requested backend cannot run the call (the message says why).
    """
    if requested == "auto":
        for backend in VERIFIED.get(device.type, ("torch",)):
            if reasons.get(backend) is None:
                return backend
        return "torch"
    reason = reasons.get(requested)
    if reason is not None:
        raise ValueError(
            f"lavo: backend={requested!r} cannot run this call: {reason}; "
            f"use backend='auto' (falls back to PyTorch) or backend='torch'"
        )
    return requested


@functools.cache
def compiled(function: Callable) -> Callable:
    """``torch.compile`` of ``function``, once per function, with the sequence length dynamic
    (one graph serves every length; lengths that are and are not a multiple of the window take
    two)."""
    return torch.compile(function, dynamic=True)

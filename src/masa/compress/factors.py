"""Cholesky factors of the calibration Grams, held in memory or, in streamed fits, in scratch files.

A method that fits many blocks together (``masa``) uses every block's factor again and again, but one
at a time. When the statistics come with a scratch directory (``CalibrationStats.scratch``, set by a
streamed compression) each factor is written there as soon as it is made, in float64 and in the
search's float32, and read back when it is used; only the factor read last is kept, per precision. The
float64 (d_in, d_in) factors of a whole model (9.7 GB at the Llama 1B shape) are then never in memory
together; a read from the page cache costs far less than the whitening it serves.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class FactorStore:
    """Lower-triangular factors by key, in memory (``scratch`` None) or in files under ``scratch``.

    ``get(key, dtype)`` returns the factor in ``dtype`` (float64 as made; the ``copies`` dtypes are
    written beside it in files, converted on use in memory); the last factor returned per dtype is kept,
    so consecutive uses of one factor read it once.
    """

    def __init__(self, scratch: Path | None, copies: tuple[torch.dtype, ...] = (torch.float32,)):
        self.scratch = scratch
        self.copies = copies
        self.device: torch.device | None = None
        self._held: dict[str, torch.Tensor] = {}  # in memory: key -> float64 factor
        self._files: dict[str, Path] = {}  # in files: key -> file
        self._last: dict[torch.dtype, tuple[str, torch.Tensor]] = {}
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, factor: torch.Tensor) -> None:
        """Keep ``factor`` (d_in, d_in) under ``key``: in a file when there is a scratch directory."""
        self.device = factor.device
        if self.scratch is None:
            self._held[key] = factor
            return
        path = self.scratch / f"factor-{len(self._files):05d}.safetensors"
        # stored transposed: a LAPACK factor is column-major, so its transpose is written without a copy
        # and read back as the same layout (the same products to the bit)
        copies = {str(dtype): factor.to(dtype).mT.contiguous().cpu() for dtype in self.copies}
        save_file({str(factor.dtype): factor.mT.contiguous().cpu(), **copies}, str(path))
        self._files[key] = path

    def get(self, key: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The factor of ``key`` in ``dtype`` on the device it was made on."""
        last = self._last.get(dtype)
        if last is not None and last[0] == key:
            return last[1]
        self._last.pop(dtype, None)  # freed before the next one is read
        if self.scratch is None:
            factor = self._held[key].to(dtype)
        else:
            name = str(dtype) if dtype in self.copies else str(torch.float64)
            with safe_open(str(self._files[key]), framework="pt") as fh:
                factor = fh.get_tensor(name).to(device=self.device, dtype=dtype).mT
        self._last[dtype] = (key, factor)
        return factor

"""Gram matrices kept in files while a streamed compression calibrates, read back when a method asks.

A method that fits blocks together needs the statistics of every block, but the float64 (d_in, d_in)
Grams of a whole model do not fit in memory (9.7 GB at the Llama 1B shape: the FFN's 8192-wide input
alone is 512 MB per block). In a streamed statistics pass each block's Grams are complete when the block
is done, so they are written to the scratch directory then (``Accumulator.spill``) and ``GramFiles``
stands in for the name -> Gram dict.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def write_gram(path: Path, gram: torch.Tensor) -> None:
    """One Gram matrix to ``path`` (safetensors)."""
    save_file({"gram": gram.detach().cpu().contiguous()}, str(path))


class GramFiles(Mapping[str, torch.Tensor]):
    """Module name -> Gram (d_in, d_in) float64, each distinct input's in its own file, read when asked.

    Modules fed the same input (q/k/v, gate/up) get the same tensor object while anyone holds it, as
    with the in-memory dict, so a method holds no more than it would there. Deleting a name forgets it
    (a consumed statistic); the files go with the scratch directory.
    """

    def __init__(self, files: dict[str, Path], owner: dict[str, str], device: torch.device):
        self._files = files  # owner -> file
        self._owner = dict(owner)  # module name -> the module whose input (and file) it shares
        self._device = device
        self._alive: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()

    def __getitem__(self, name: str) -> torch.Tensor:
        owner = self._owner[name]
        gram = self._alive.get(owner)
        if gram is None:
            with safe_open(str(self._files[owner]), framework="pt") as fh:
                gram = fh.get_tensor("gram").to(self._device)
            self._alive[owner] = gram
        return gram

    def __delitem__(self, name: str) -> None:
        del self._owner[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def same_input(self, name: str) -> list[str]:
        """The modules whose Gram is ``name``'s, without reading any file."""
        return [key for key, owner in self._owner.items() if owner == self._owner[name]]


def same_input(grams: Mapping[str, torch.Tensor], name: str) -> list[str]:
    """The modules fed the same input as ``name`` (one Gram tensor serves them: q/k/v, gate/up)."""
    if isinstance(grams, GramFiles):
        return grams.same_input(name)
    gram = grams[name]
    return [key for key, value in grams.items() if value is gram]

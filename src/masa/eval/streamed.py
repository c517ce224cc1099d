"""A causal LM evaluated straight from its files, one block at a time (``masa eval --low-memory``).

Every forward reads each block from the safetensors files, runs it on the whole batch, and frees it,
so memory holds one block, the embeddings and head, and the batch's activations; the price is one read
of the blocks per batch of windows (the system's page cache serves repeats when it can hold them).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from masa.arch import find_blocks
from masa.compress.calibration.collect import BlockAccess, BlockFeed, _lens
from masa.io.stream import StreamedModel


class _Blocks(BlockAccess):
    def __init__(self, streamed: StreamedModel, blocks_path: str):
        self.streamed, self.blocks_path = streamed, blocks_path

    def load(self, index: int) -> None:
        self.streamed.load(f"{self.blocks_path}.{index}")

    def done(self, index: int) -> None:
        self.streamed.release(f"{self.blocks_path}.{index}")


class StreamedCausalLM(nn.Module):
    """``forward(input_ids (B, T)) -> logits (B, T, V)`` of the causal LM in ``directory``, streamed."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self._streamed = StreamedModel(directory, device=device, dtype=dtype)
        model = self._streamed.model
        self.config = model.config
        self._blocks_path, _ = find_blocks(
            model
        )  # not kept as a submodule: the parameters here are the loaded ones
        self._streamed.load("", exclude=self._blocks_path)
        self._lens = _lens(model)
        if self._lens is None:
            raise ValueError(
                f"{directory} has no language-model head; --low-memory evaluates causal LMs only"
            )

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        access = _Blocks(self._streamed, self._blocks_path)
        blocks = self._streamed.model.get_submodule(self._blocks_path)
        feed = BlockFeed.capture(self._streamed.model, blocks, [input_ids.to(self._streamed.device)], access)
        for i, block in enumerate(blocks):
            access.load(i)
            outputs, _ = feed.run(i, block)
            feed.advance(outputs)
            access.done(i)
        hidden = feed.hidden[0]  # (B, T, d)
        for module in self._lens:
            hidden = module(hidden)
        return hidden  # (B, T, V)

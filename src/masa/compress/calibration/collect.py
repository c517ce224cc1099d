"""Calibration statistics of the layers to compress, gathered block by block.

The N calibration sequences are streamed through the model one block at a time: the inputs of the
first block (and the keyword arguments the model passes it: attention mask, rotary tables, position
ids ...) are captured once, then each block runs on the stored hidden states while forward pre-hooks on
its target layers accumulate X^T X (float32 per batch, summed in float64; once per distinct input: Q, K and V share one) and the
channel means of |x|. The block's outputs become the next block's inputs, so peak memory is about one
block's activations, the stored hidden states and the Gram matrices. Causal LMs also get the logit-lens
drift between consecutive blocks (MASA's grouping signal).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from masa.arch import find_blocks, get_adapter
from masa.compress.calibration.gram_files import GramFiles, write_gram

LENS_CHUNK = 1024  # tokens per logit-lens chunk: bounds the (chunk, vocab) logits held at once
LENS_TOKENS = 1024  # about this many evenly spaced tokens per block score the logit-lens drift


@dataclass
class CalibrationStats:
    """Input statistics of the target layers over the calibration rows.

    Attributes:
        grams: module name -> X^T X (d_in, d_in) float64, summed over rows; modules fed the same input
            (q/k/v of a block; gate/up) share one tensor object (``gram_files.same_input`` names them).
            A dict, or ``GramFiles`` (read from files when asked) after a calibration with a scratch
            directory.
        abs_mean: module name -> mean |x| per input channel (d_in,) float64 (ASVD's scales); shared
            like ``grams``.
        n_rows: calibration rows accumulated (tokens; for images, patch tokens and class tokens).
        block_kl: causal LMs: KL(p_l || p_{l+1}) between the logit-lens next-token distributions of
            consecutive blocks, averaged over tokens (length L - 1); None for encoders.
        n_samples, seq_len: the calibration batch shape (N, T).
        peak_memory_bytes: peak memory growth while calibrating (device allocator, or process RSS on CPU).
        seconds: wall time of the calibration.
        streamed: whether it ran block by block (models with an architecture adapter).
        fisher: module name -> row-wise Fisher information (d_out,) float64, for methods that need it
            (``calibration.fisher``); None when not computed.
        consumable: nobody reads these statistics after the method that gets them (one block's, in a
            block-by-block walk, or a streamed statistics pass): the method may drop each Gram matrix from
            ``grams`` once it is done with it, so that the (d_in, d_in) matrices are not all held until the
            last layer is fitted.
        scratch: a directory where a method may keep what it derives from these statistics (Cholesky
            factors) in files rather than in memory; set by streamed compressions, removed after them.
    """

    grams: Mapping[str, torch.Tensor]
    abs_mean: dict[str, torch.Tensor]
    n_rows: int
    block_kl: list[float] | None
    n_samples: int = 0
    seq_len: int = 0
    peak_memory_bytes: int = 0
    seconds: float = 0.0
    streamed: bool = field(default=True, compare=False)
    fisher: dict[str, torch.Tensor] | None = field(default=None, compare=False)
    consumable: bool = field(default=False, compare=False)
    scratch: Path | None = field(default=None, compare=False)

    def check_rows(self, widths: dict[str, int]) -> None:
        """Warn when fewer rows were seen than a targeted layer has inputs (``widths``: name -> d_in): its
        Gram matrix is then rank-deficient, and the whitened methods rest on the damping alone."""
        narrow = {name: d for name, d in widths.items() if d > self.n_rows}
        if self.n_rows and narrow:
            name, width = max(narrow.items(), key=lambda item: item[1])
            warnings.warn(
                f"calibration saw {self.n_rows} rows, fewer than the {width} inputs of {name} (and "
                f"{len(narrow) - 1} other layers): their Gram matrices are rank-deficient, so the whitening "
                f"rests on damping; give at least {width} calibration tokens (--calib-samples x --calib-len)",
                stacklevel=2,
            )

    def summary(self) -> dict:
        """JSON-able summary for reports and config.json."""
        return {
            "samples": self.n_samples,
            "seq_len": self.seq_len,
            "rows": self.n_rows,
            "peak_memory_mb": round(self.peak_memory_bytes / 2**20, 2),
            "seconds": round(self.seconds, 3),
            "streamed": self.streamed,
            "block_kl": self.block_kl,
        }


# ------------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory above the starting point: the CUDA allocator's peak, else process RSS.

    On the CPU the RSS is sampled where the caller asks (``sample``), and on Linux the kernel's own
    high-water mark (VmHWM) is read too: once it rises above its value at the start, it is the peak of
    this span, including the moments between samples (the inside of a fit).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = self._rss()
        self.device, self.peak = device, self.base
        self.high_water = self._high_water()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime high-water mark is the best available
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _high_water() -> int | None:
        """The process's peak RSS so far (VmHWM), None where /proc does not give it."""
        try:
            with open("/proc/self/status") as fh:
                line = next(line for line in fh if line.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024  # kB
        except (OSError, StopIteration, ValueError):
            return None

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, self._rss())

    def bytes(self) -> int:
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        self.sample()
        peak, high_water = self.peak, self._high_water()
        if high_water is not None and self.high_water is not None and high_water > self.high_water:
            peak = max(peak, high_water)  # a new high since the start: reached inside this span
        return max(0, peak - self.base)


# ------------------------------------------------------------------------------------- accumulation


def sum_device(device: torch.device) -> torch.device:
    """Where float64 sums live: the model's device, or the CPU for MPS (no float64 there)."""
    return torch.device("cpu") if device.type == "mps" else device


class Accumulator:
    """Forward pre-hooks summing X^T X and |x| per distinct input of the hooked modules.

    Each batch's X^T X is computed in float32 on the model's device (fast on a GPU, bf16/fp16 inputs
    upcast first) and the batches are summed in float64 (on the CPU for MPS, which has no float64).
    """

    def __init__(self, meter: PeakMemory, scratch: Path | None = None):
        self.grams: dict[str, torch.Tensor] = {}
        self.scratch = scratch  # where finished Grams go (``spill``); None keeps them in memory
        self._files: dict[str, Path] = {}  # owner -> file of its spilled Gram
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.meter = meter
        self.sum_device = sum_device(meter.device)
        self.rows: dict[str, int] = {}  # owner -> rows summed into its Gram
        self._owner: dict[str, str] = {}  # module name -> name of the module whose sums it shares
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, owner), one forward

    @contextlib.contextmanager
    def hooks(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def new_forward(self) -> None:
        """Forget the inputs of the previous forward (their ids may be reused)."""
        self._seen.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if id(x) in self._seen:  # same input as an earlier module of this forward: share its sums
                self._owner.setdefault(name, self._seen[id(x)][1])
                return
            self._seen[id(x)] = (x, name)
            owner = self._owner.setdefault(name, name)
            rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (B*T, d_in), on the model's device
            if owner not in self.grams:
                self.grams[owner] = rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                                   device=self.sum_device)  # fmt: skip
                self.abs_sums[owner] = rows.new_zeros(
                    rows.shape[1], dtype=torch.float64, device=self.sum_device
                )
            self.rows[owner] = self.rows.get(owner, 0) + rows.shape[0]
            # fp32 per batch, fp64 sum: add_ widens element by element (no float64 copy of the batch's Gram)
            self.grams[owner].add_((rows.T @ rows).to(self.sum_device))
            self.abs_sums[owner] += rows.abs().sum(0, dtype=torch.float64).to(self.sum_device)
            self.meter.sample()

        return hook

    def spill(self, names: list[str]) -> None:
        """With a scratch directory: write the Grams of the modules ``names`` (finished: their block will
        not run again) to files and drop them from memory."""
        if self.scratch is None:
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        for owner in dict.fromkeys(self._owner[n] for n in names if n in self._owner):
            if owner in self.grams:
                self._files[owner] = self.scratch / f"gram-{len(self._files):05d}.safetensors"
                write_gram(self._files[owner], self.grams.pop(owner))

    def shared(self) -> tuple[Mapping[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """Per module name: its Gram and mean |x| (one tensor object per distinct input); the rows seen.
        With a scratch directory the Grams stay in their files (``GramFiles``)."""
        means = {owner: total / self.rows[owner] for owner, total in self.abs_sums.items()}
        if self.scratch is not None:
            self.spill(list(self._owner))
            grams = GramFiles(self._files, self._owner, self.sum_device)
        else:
            grams = {name: self.grams[owner] for name, owner in self._owner.items()}
        n_rows = max(self.rows.values(), default=0)
        return grams, {name: means[owner] for name, owner in self._owner.items()}, n_rows


# ------------------------------------------------------------------------------------- streaming


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


def _model_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def attention_kinds(model: nn.Module, n_blocks: int) -> list[object]:
    """What decides the keyword arguments each block receives: the config's ``layer_types`` where the
    family mixes them (Gemma-2/3: sliding-window and global layers get different masks and rotary
    tables), else one kind for all."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return list(types) if isinstance(types, (list, tuple)) and len(types) == n_blocks else [None] * n_blocks


def _capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]
) -> tuple[list[int], list[list[tuple[tuple, dict]]]]:
    """The (args, kwargs) each batch passes to the first block of each attention kind, and for every block
    the index of the kind whose arguments it takes. The forward stops at the last such first block."""
    kinds = attention_kinds(model, len(blocks))
    firsts = [kinds.index(k) for k in dict.fromkeys(kinds)]  # first block of each kind, in order
    kind_of = [firsts.index(kinds.index(k)) for k in kinds]
    captured: list[list[tuple[tuple, dict]]] = [[] for _ in batches]
    current = 0

    def hook_for(last: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            captured[current].append((args, kwargs))
            if last:
                raise _Stop

        return hook

    handles = [
        blocks[i].register_forward_pre_hook(hook_for(i == firsts[-1]), with_kwargs=True) for i in firsts
    ]
    try:
        for current, batch in enumerate(batches):  # noqa: B007 (read by the hooks)
            with contextlib.suppress(_Stop):
                model(batch, **_model_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
    return kind_of, captured


def _lens(model: nn.Module) -> list[nn.Module] | None:
    """The modules of the logit lens (final norm ..., output head), or None (encoders, no head)."""
    paths = get_adapter(model).lens
    if paths is None:
        return None
    modules = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is None and path == paths[-1]:
            return None  # a base model without its head
        if module is not None:
            modules.append(module)
    return modules


def _lens_kl(
    lens: list[nn.Module], before: torch.Tensor, after: torch.Tensor, stride: int = 1
) -> tuple[float, int]:
    """Sum over every ``stride``-th token of KL(p_before || p_after) of the logit-lens distributions, and
    the count of those tokens. The head costs tokens x d x vocab per call, more than the block itself at
    large vocabularies, and a mean over a thousand tokens ranks the drifts as well as all of them do."""
    before = before.reshape(-1, before.shape[-1])[::stride]  # (rows, d)
    after = after.reshape(-1, after.shape[-1])[::stride]
    total = 0.0
    for start in range(0, before.shape[0], LENS_CHUNK):
        logp = []
        for hidden in (before[start : start + LENS_CHUNK], after[start : start + LENS_CHUNK]):
            for module in lens:
                hidden = module(hidden)
            logp.append(F.log_softmax(hidden.to(torch.float64), dim=-1))  # (chunk, V)
        total += float(F.kl_div(logp[1], logp[0], log_target=True, reduction="sum"))
    return total, before.shape[0]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's loaded parameters (a streamed skeleton keeps the others on ``meta``)."""
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    raise ValueError("the model has no loaded parameter to tell its device")


def _has_adapter(model: nn.Module) -> bool:
    try:
        get_adapter(model)
    except ValueError:
        return False
    return True


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_modules(model: nn.Module, module_names: list[str]) -> tuple[nn.ModuleList, list[dict]]:
    """The blocks, and per block the target modules inside it (raises for a target outside the blocks)."""
    blocks_path, blocks = find_blocks(model)
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for name in module_names:
        index, _, _ = name.removeprefix(blocks_path + ".").partition(".")
        if not name.startswith(blocks_path + ".") or not index.isdigit():
            raise ValueError(
                f"{name} lies outside the blocks at {blocks_path!r}; block-by-block calibration covers "
                "only modules inside the blocks: exclude it from the targets"
            )
        per_block[int(index)][name] = model.get_submodule(name)
    return blocks, per_block


@torch.no_grad()
def calibrate(
    model: nn.Module,
    tokens: torch.Tensor,
    module_names: list[str],
    logit_lens: bool = True,
    batch_size: int = 8,
    progress: Callable[[Iterator], Iterator] | None = None,
    access: BlockAccess | None = None,
    scratch: Path | None = None,
) -> CalibrationStats:
    """Gram matrices and channel scales of the inputs of ``module_names`` over ``tokens``: token ids
    (N, T), or images (N, C, H, W) for a vision model (its rows are the patch and class tokens).

    Streams block by block for models with an architecture adapter; other models run whole forward
    passes with the same hooks. ``progress`` wraps the block iterator (e.g. ``tqdm``); ``access`` loads
    and frees each block's weights around its turn (a streamed model); with ``scratch`` each block's Grams
    are written there once the block is done and the statistics read them back when asked
    (``GramFiles``), so a whole model's Grams are never held together.
    """
    images = tokens.ndim == 4 and tokens.is_floating_point()
    if tokens.numel() == 0 or not (images or (tokens.ndim == 2 and not tokens.is_floating_point())):
        raise ValueError(
            "calibration inputs must be non-empty (N, T) integer token ids or (N, C, H, W) float images, got "
            f"{tuple(tokens.shape)} {tokens.dtype}"
        )
    if not module_names:
        raise ValueError("no modules to calibrate: give at least one target module name")
    device = model_device(model)
    tokens = tokens.to(device)
    batches = list(tokens.split(batch_size))
    start, meter = time.perf_counter(), PeakMemory(device)
    accumulator = Accumulator(meter, scratch)
    was_training = model.training
    model.eval()
    streamed = _has_adapter(model)
    try:
        if streamed:
            blocks, per_block = _block_modules(model, module_names)
            lens = _lens(model) if logit_lens else None
            block_kl = _stream(
                model, batches, blocks, per_block, accumulator, lens, progress, access or BlockAccess()
            )
        else:
            _calibrate_whole(model, batches, module_names, accumulator)
            block_kl = None
    finally:
        model.train(was_training)
    grams, abs_mean, n_rows = accumulator.shared()
    if missing := [n for n in module_names if n not in grams]:
        raise ValueError(f"modules {missing[:5]} never ran during calibration; they cannot be calibrated")
    return CalibrationStats(
        grams, abs_mean, n_rows, block_kl, tokens.shape[0], n_rows // tokens.shape[0], meter.bytes(),
        time.perf_counter() - start, streamed,
    )  # fmt: skip


class BlockAccess:
    """Makes block i's weights available and disposes of them; this base class is for a model in memory
    (no-ops). A streamed model reads the block from its files and frees it (``masa.compress.streaming``)."""

    def load(self, index: int) -> None:
        """Block ``index``'s weights are needed now."""

    def done(self, index: int) -> None:
        """Block ``index`` will not run again."""


@dataclass
class BlockFeed:
    """The inputs of the blocks while streaming: per batch the captured (args, kwargs) of each attention
    kind, the current hidden states (B, T, d), and for every block the index of its kind."""

    kind_of: list[int]
    captured: list[list[tuple[tuple, dict]]]
    hidden: list[torch.Tensor]

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        blocks: nn.ModuleList,
        batches: list[torch.Tensor],
        access: BlockAccess | None = None,
    ) -> BlockFeed:
        """The first block's inputs per batch. Blocks that run before the first block of the last attention
        kind (Gemma-2/3 alternate two) are loaded through ``access`` for the capture."""
        kinds = attention_kinds(model, len(blocks))
        for i in range(max(kinds.index(k) for k in dict.fromkeys(kinds))):
            (access or BlockAccess()).load(i)
        kind_of, captured = _capture_block_inputs(model, blocks, batches)
        hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in (b[0] for b in captured)]
        return cls(kind_of, captured, hidden)

    def run(
        self,
        i: int,
        block: nn.Module,
        accumulator: Accumulator | None = None,
        lens: list[nn.Module] | None = None,
    ) -> tuple[list[torch.Tensor], float | None]:
        """Block ``i``'s outputs per batch on the current hidden states (not stored: see ``advance``), and
        the mean logit-lens KL between its inputs and outputs when ``lens`` is given."""
        outputs, kl_sum, kl_rows = [], 0.0, 0
        stride = max(1, sum(h.shape[:-1].numel() for h in self.hidden) // LENS_TOKENS)
        for b, per_kind in enumerate(self.captured):
            args, kwargs = per_kind[self.kind_of[i]]
            if accumulator is not None:
                accumulator.new_forward()
            call_args, call_kwargs = _replace_hidden(args, kwargs, self.hidden[b])
            out = _hidden(block(*call_args, **call_kwargs))  # (B, T, d)
            if lens is not None:
                kl, rows = _lens_kl(lens, self.hidden[b], out, stride)
                kl_sum, kl_rows = kl_sum + kl, kl_rows + rows
            outputs.append(out)
            if accumulator is not None:
                accumulator.meter.sample()
        if accumulator is not None:
            accumulator.new_forward()
        return outputs, (kl_sum / kl_rows if lens is not None else None)

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The next block's inputs are ``outputs``."""
        self.hidden = outputs


def _stream(
    model: nn.Module,
    batches: list[torch.Tensor],
    blocks: nn.ModuleList,
    per_block: list[dict[str, nn.Module]],
    accumulator: Accumulator,
    lens: list[nn.Module] | None,
    progress: Callable | None,
    access: BlockAccess,
) -> list[float] | None:
    """Run the blocks one at a time over the stored hidden states; returns the logit-lens KLs."""
    feed = BlockFeed.capture(model, blocks, batches, access)
    block_kl: list[float] = []
    indices = range(len(blocks)) if progress is None else progress(range(len(blocks)))
    for i in indices:
        access.load(i)
        with accumulator.hooks(per_block[i]):
            outputs, kl = feed.run(i, blocks[i], accumulator, lens if i > 0 else None)
        feed.advance(outputs)
        access.done(i)
        accumulator.spill(list(per_block[i]))
        if kl is not None:
            block_kl.append(kl)
    return block_kl if lens is not None else None


def _calibrate_whole(
    model: nn.Module, batches: list[torch.Tensor], module_names: list[str], accumulator: Accumulator
) -> None:
    """Fallback without an architecture adapter: whole forward passes with the same hooks (no lens)."""
    modules = {name: model.get_submodule(name) for name in module_names}
    with accumulator.hooks(modules):
        for batch in batches:
            accumulator.new_forward()
            model(batch, **_model_kwargs(model))
    accumulator.new_forward()

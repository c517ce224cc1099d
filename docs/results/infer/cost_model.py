"""The run-time cost model of docs/compression.md ("Run time"), evaluated on saved models.

    python docs/results/infer/cost_model.py ORIGINAL MODEL_DIR ... [--tokens 2048 8 1] [--out FILE.md]

For each model in compact form: multiply-adds per token of its linear layers (attention scores and
norms excluded: the same in every variant) when one call carries T tokens, and the weight bytes one
call streams (a shared matrix is read again by every layer that uses it); each as a ratio to the first
model. The rules are the layers' own: a shared-atom layer applies the atoms directly for one atom or one
token and builds its weight otherwise; masa's refined layer folds its correction into that weight when
T (d_in + d_out) > d_in d_out; CoSpaDi gathers s codes per output for few tokens and scatters a
(d_out, k) code matrix otherwise. Dense form: every variant costs what the original costs.
"""

import argparse
from pathlib import Path

from torch import nn

import masa
from masa.nn.basis import BasisLinear, SparseCodeLinear
from masa.nn.lowrank import LowRankLinear
from masa.nn.shared import RefinedSharedLinear, SharedLinear


def _shared(layer: SharedLinear, tokens: int) -> tuple[float, float]:
    """(multiply-adds, numbers read) per call of a shared-atom layer."""
    s, size = layer.dictionary.n_atoms, layer.in_features * layer.out_features
    if tokens * (s - 1) <= s:  # atoms applied directly
        return tokens * s * size, s * size
    return s * size + tokens * size, s * size + 2 * size  # build (write) and read the weight


def layer_cost(module: nn.Module, tokens: int) -> tuple[float, float] | None:
    """(multiply-adds, weight numbers read) per call with ``tokens`` tokens; None: not a leaf layer."""
    d_in, d_out = getattr(module, "in_features", 0), getattr(module, "out_features", 0)
    if isinstance(module, RefinedSharedLinear):
        r = module.correction.rank
        if tokens * (d_in + d_out) > d_in * d_out:  # folded: build shared + U V, one matmul
            s = module.shared.dictionary.n_atoms
            return (s + r) * d_in * d_out + tokens * d_in * d_out, (s + 2) * d_in * d_out + r * (d_in + d_out)
        flops, read = _shared(module.shared, tokens)
        return flops + tokens * r * (d_in + d_out), read + r * (d_in + d_out)
    if isinstance(module, SharedLinear):
        return _shared(module, tokens)
    if isinstance(module, LowRankLinear):
        return tokens * module.rank * (d_in + d_out), module.rank * (d_in + d_out)
    if isinstance(module, BasisLinear):
        k = module.shared.rank
        return tokens * k * (d_in + d_out), k * (d_in + d_out)
    if isinstance(module, SparseCodeLinear):
        k, s = module.shared.rank, module.sparsity
        if tokens * s > k:  # scatter into a transient (d_out, k) code matrix, one matmul
            return tokens * k * (d_in + d_out), k * d_in + 2 * d_out * k + 1.25 * d_out * s
        return tokens * (k * d_in + d_out * s), k * d_in + 1.25 * d_out * s  # gather (uint8 indices)
    if type(module) is nn.Linear:
        return tokens * d_in * d_out, d_in * d_out
    return None


def model_cost(model: nn.Module, tokens: int) -> tuple[float, float]:
    """(multiply-adds per token, weight bytes read per call) of every linear layer."""
    inner = {
        id(m)
        for r in model.modules()
        if isinstance(r, RefinedSharedLinear)
        for m in r.modules()
        if m is not r
    }
    flops = read = 0.0
    for module in model.modules():
        cost = None if id(module) in inner else layer_cost(module, tokens)
        if cost is not None:
            flops, read = flops + cost[0], read + cost[1]
    return flops / tokens, 4 * read  # float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8, 1])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows, reference = [], None
    for directory in args.models:
        costs = [model_cost(masa.load(directory), t) for t in args.tokens]
        reference = reference or costs
        cells = [directory.name]
        for (flops, read), (f0, r0) in zip(costs, reference, strict=True):
            cells += [f"{f0 / flops:.2f}", f"{read / 2**20:.1f} ({read / r0:.2f})"]
        rows.append("| " + " | ".join(cells) + " |")
    head = ["model"]
    for t in args.tokens:
        head += [f"T={t}: speed bound (orig / model MACs)", f"T={t}: weight MiB read per call (x orig)"]
    text = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

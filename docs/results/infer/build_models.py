"""Build the models `masa bench infer` compares: a synthetic Llama (blocks alike: block 0 plus noise,
so shared atoms pay off as in a trained model) and its compressions, saved under OUT.

    python docs/results/infer/build_models.py OUT [--shape bench|1gb|1b] [--ratios 0.4 ...] [--methods ...]
        [--targets all-linear|attn] [--calib N] [--options JSON] [--masa-max-atoms S]

bench: 12 blocks, d=256 (the issue's model, 44 MiB); 1gb: 16 blocks, d=1024, ffn 2816, vocab 32000
(266 M parameters, 1.0 GiB in float32: past a server CPU's last-level cache, so decoding is bound by
memory bandwidth); 1b: 16 blocks, d=2048, ffn 5632, vocab 32000 (~1 B parameters, ~3.8 GB in float32).
Each compression's wall time is appended to OUT/build_times.json (one thread unless OMP_NUM_THREADS
says otherwise).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers as tf

import masa
from masa.compress import CompressConfig, compress

OPTIONS = {"cospadi": {"iterations": 2}}
SHAPES = {
    "bench": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                  num_attention_heads=4),
    "1gb": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                num_attention_heads=16),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16),
}  # fmt: skip


def base(shape: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(max_position_embeddings=512, **SHAPES[shape])
    model = tf.LlamaForCausalLM(config).to(device).eval()
    with torch.no_grad():
        for block in model.model.layers[1:]:
            for p, p0 in zip(block.parameters(), model.model.layers[0].parameters(), strict=True):
                p.copy_(p0 + 0.3 * p0.std() * torch.randn_like(p0))
    return model


def cap_masa_atoms(max_atoms: int) -> None:
    """Make ``masa`` search S = 0 .. max_atoms per group instead of every S its budget affords.

    The full search costs (S_max + 1) x blocks float64 whitened SVDs per role and group (plus the
    grouping candidates): minutes at d=256, hours at d=1024 on one thread. With blocks built as
    block 0 plus noise, masa chose S = 1 for every role at d=256 (bench shape, 40 %), so capping the
    search at that S gives the same kind of model for a fraction of the cost. Same code as
    ``masa.compress.methods.masa._fit_unit`` but for the cap.
    """
    import math

    from masa.compress.methods import masa as method

    def fit_unit(unit, keep):
        n, budget = len(unit.projections), math.floor(keep * unit.dense) - unit.biases
        s_max = min(max_atoms, n - 1, max(0, budget // unit.atom_cost))
        atoms = method._mean_gram_atoms(unit.projections, s_max)
        fits = [method._refits(p, atoms) for p in unit.projections]
        ranks = {}
        for s in range(s_max + 1):
            spectra = [f[s][1] for f in fits]
            found = method._allocate(
                spectra, [unit.rank_cost] * n, [1.0] * n, [int(s == 0)] * n, budget - s * unit.atom_cost
            )
            if found is not None:
                ranks[s], unit.search[s] = found, method._error(spectra, found)
        best = min(unit.search, key=unit.search.get)
        unit.atoms = atoms[:best] if best else None
        unit.coefficients = torch.stack([f[best][0] for f in fits]) if best else None
        unit.spectra, unit.ranks = [f[best][1] for f in fits], ranks[best]
        return unit

    method._fit_unit = fit_unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="bench")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4])
    parser.add_argument("--methods", nargs="+", default=["svd-llm", "basis-sharing", "cospadi", "masa"])
    parser.add_argument("--targets", choices=["all-linear", "attn"], default="all-linear")
    parser.add_argument(
        "--calib", type=int, default=16, help="calibration samples of 128 tokens (default 16)"
    )
    parser.add_argument(
        "--options", type=json.loads, default={}, help='per method, e.g. {"masa": {"groups": 1}}'
    )
    parser.add_argument("--masa-max-atoms", type=int, help="cap masa's search over S (see cap_masa_atoms)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.masa_max_atoms is not None:
        cap_masa_atoms(args.masa_max_atoms)
    if not (args.out / "original").exists():
        masa.save(base(args.shape, args.device), args.out / "original")
    vocab = SHAPES[args.shape]["vocab_size"]
    calib = torch.randint(0, vocab, (args.calib, 128), generator=torch.Generator().manual_seed(1))
    suffix = "" if args.targets == "all-linear" else "-attn"
    log = args.out / "build_times.json"
    for ratio in args.ratios:
        for method in args.methods:
            target = args.out / f"{method}-{round(ratio * 100)}{suffix}"
            if target.exists():
                continue
            model = base(args.shape, args.device)
            config = CompressConfig(
                method,
                ratio,
                targets=(args.targets,),
                options=OPTIONS.get(method, {}) | args.options.get(method, {}),
            )
            start = time.perf_counter()
            compress(model, config, calib.to(args.device))
            seconds = time.perf_counter() - start
            masa.save(model, target)
            times = json.loads(log.read_text()) if log.exists() else {}
            times[target.name] = {"seconds": round(seconds, 1), "calib": list(calib.shape),
                                  "threads": torch.get_num_threads(), "options": config.options,
                                  "masa_max_atoms": args.masa_max_atoms}  # fmt: skip
            log.write_text(json.dumps(times, indent=1))
            print(f"saved {target} ({seconds:.0f} s to compress)", flush=True)


if __name__ == "__main__":
    main()

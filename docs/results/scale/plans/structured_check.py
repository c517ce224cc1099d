"""masa's plan on a trained model given shared structure (see search_check.json): q, k, up and o of blocks
0-5 and 6-11 become blocks 0 and 6's weights plus 30 / 60 / 100 / 200 % Gaussian noise.

Usage: PYTHONPATH=src python docs/results/scale/plans/structured_check.py MODEL_DIR > OUT.json
"""

import json
import sys

import torch

import masa
from masa.arch import find_blocks, get_adapter, linear_weight
from masa.compress import CompressConfig
from masa.compress.api import calibration_tokens
from masa.compress.calibration import cached_calibrate
from masa.compress.layout import resolve_layout
from masa.compress.registry import get_method
from masa.data.tokenizer import load_tokenizer

torch.set_num_threads(1)
d = sys.argv[1]
model = masa.load(d)
g = torch.Generator().manual_seed(0)
_, blocks = find_blocks(model)
paths = get_adapter(model).roles
with torch.no_grad():
    for role, noise in (("q", 0.3), ("k", 0.6), ("up", 1.0), ("o", 2.0)):
        bases = [linear_weight(blocks[i].get_submodule(paths[role]))[0].clone() for i in (0, 6)]
        for i, b in enumerate(blocks):
            w, _ = linear_weight(b.get_submodule(paths[role]))
            base = bases[i // 6]
            w.copy_(base + noise * base.std() * torch.randn(base.shape, generator=g))
layout = resolve_layout(model, CompressConfig("masa", 0.2, ("all-linear",)))
tokens = calibration_tokens("data/gutenberg/austen-emma.txt", load_tokenizer(d), 32, 128)
stats, _ = cached_calibrate(model, tokens, layout.names, None, None)
out = {}
for ratio in (0.2, 0.4):
    rep = get_method("masa").fn(layout, stats, CompressConfig("masa", ratio, ("all-linear",))).report
    out[ratio] = (
        rep["objective"],
        rep["fallback"],
        {
            r: [(len(g["blocks"]), g["atoms"], g["ranks"]) for g in v["groups"]]
            for r, v in rep["roles"].items()
        },
    )
print(json.dumps(out))

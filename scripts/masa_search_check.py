"""masa's plan (objective, fallback, atoms per group) at ratios 0.1-0.6 on a trained model: run it on two
commits to check that a change to the search leaves the chosen fits as they were.

Usage: PYTHONPATH=src python scripts/masa_search_check.py MODEL_DIR attn|all-linear > OUT.json
(calibration: the first 32 x 128 tokens of data/gutenberg/austen-emma.txt; one torch thread)
"""

import json
import sys

import torch

import masa
from masa.compress import CompressConfig
from masa.compress.api import calibration_tokens
from masa.compress.calibration import cached_calibrate
from masa.compress.layout import resolve_layout
from masa.compress.registry import get_method
from masa.data.tokenizer import load_tokenizer

torch.set_num_threads(1)
d, targets = sys.argv[1], sys.argv[2]
model = masa.load(d)
layout = resolve_layout(model, CompressConfig("masa", 0.2, (targets,)))
tokens = calibration_tokens("data/gutenberg/austen-emma.txt", load_tokenizer(d), 32, 128)
stats, _ = cached_calibrate(model, tokens, layout.names, None, None)
out = {}
for ratio in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
    rep = get_method("masa").fn(layout, stats, CompressConfig("masa", ratio, (targets,))).report
    out[ratio] = (
        rep["objective"],
        rep["fallback"],
        {r: [(len(g["blocks"]), g["atoms"]) for g in v["groups"]] for r, v in rep["roles"].items()},
    )
print(json.dumps(out))

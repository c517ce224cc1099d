"""Compare the two calibration modes (original activations vs sequential on compressed outputs).

Usage: PYTHONPATH=src python scripts/calibration_modes.py MODEL_DIR OUT.json
svd-llm on all-linear at ratios 0.2 / 0.4 and on attn at 0.4; perplexity on the first 8k tokens of
wikitext2-test (chunked windows of the calibration length); calibration 32 x 128 tokens of
gutenberg/austen-emma.txt; wall time of calibration + fitting.
"""

import itertools
import json
import sys
import time

import torch

import masa
from masa.compress import CompressConfig, compress
from masa.data.tokenizer import encode, load_tokenizer
from masa.eval import load_eval_text, perplexity

model_dir, out = sys.argv[1], sys.argv[2]
tokenizer = load_tokenizer(model_dir)
eval_ids = torch.tensor(encode(tokenizer, load_eval_text("wikitext2-test")), dtype=torch.long)[:8192]
rows = [
    {"method": "dense", "ppl": perplexity(masa.load(model_dir), eval_ids, seq_len=128, progress=False).ppl}
]
print(rows[-1], flush=True)
RUNS = (("svd-llm", "all-linear", 0.2), ("svd-llm", "all-linear", 0.4), ("svd-llm", "attn", 0.4))
for (method, targets, ratio), mode in itertools.product(RUNS, ("original", "sequential")):
    model = masa.load(model_dir)
    config = CompressConfig(method, ratio, (targets,), calib_samples=32, calib_len=128)
    start = time.perf_counter()
    compress(model, config, "data/gutenberg/austen-emma.txt", tokenizer, mode=mode)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, eval_ids, seq_len=128, progress=False).ppl
    rows.append(dict(method=method, targets=targets, ratio=ratio, mode=mode, ppl=ppl, seconds=seconds))
    print(rows[-1], flush=True)
with open(out, "w") as fh:
    json.dump(rows, fh, indent=2)

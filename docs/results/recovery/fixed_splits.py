"""Perplexity increase and calibration perplexity of EoRA at fixed splits (``eora:FRACTION``), scored
with the protocol of ``masa bench recovery``: does a criterion track the loss along the split?

    python docs/results/recovery/fixed_splits.py MODEL_DIR METHOD RATIO plain,0.02,0.05,0.1,0.2,0.5

prints one JSON line per split: the WikiText-2 increase over dense, the calibration perplexity, and the
summed whitened error of the candidate (what the first search minimised).
"""

import copy
import json
import sys
from pathlib import Path

import torch

from masa.bench.compress_suite import _score, load_base
from masa.bench.recovery import RecoveryBenchConfig
from masa.compress import CompressConfig, calibrate, compress
from masa.compress.api import calibration_tokens, resolve_targets
from masa.data.tokenizer import encode, load_tokenizer
from masa.eval import load_eval_text
from masa.eval.datasets import DATA_DIR

torch.set_num_threads(1)
model_dir, method, ratio, shares = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4].split(",")
cfg = RecoveryBenchConfig()
base, T = load_base(model_dir)
tok = load_tokenizer(model_dir)
eval_ids = torch.tensor(encode(tok, load_eval_text(cfg.eval_text)), dtype=torch.long)[: cfg.eval_tokens]
calib = calibration_tokens(DATA_DIR / cfg.calib_text, tok, cfg.calib_samples, T)  # (N, T)
stats = calibrate(base, calib, resolve_targets(copy.deepcopy(base), CompressConfig("svd", 0.5, "all-linear")))
dense = _score(base, eval_ids, T, cfg.eval_batch_size)["ppl"]
for share in shares:
    model = copy.deepcopy(base)
    spec = None if share == "plain" else f"eora:{share}"
    result = compress(model, CompressConfig(method, ratio, "all-linear", compensate=spec), calib, stats=stats)
    tried = result.report.get("compensation", {}).get("tried", [{}])[0]
    ppl = _score(model, eval_ids, T, cfg.eval_batch_size)["ppl"]
    calib_ppl = _score(model, calib.flatten(), T, cfg.eval_batch_size)["ppl"]
    print(json.dumps({"method": method, "ratio": ratio, "share": share, "increase": round(ppl - dense, 3),
                      "calib_ppl": round(calib_ppl, 3), "whitened_error": tried.get("whitened_error")}), flush=True)  # fmt: skip

"""Median calibration + fit of svd-llm and masa over the rounds in repeats/ (each a `masa bench scale` run).

Usage: python docs/results/scale/pruned/summarise_repeats.py > docs/results/scale/pruned/repeats.md
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

here = Path(__file__).parent / "repeats"
totals = defaultdict(list)  # (ratio, method) -> [calibration + fit per round]
ratios = defaultdict(list)  # ratio -> [masa / svd-llm per round]
for run in sorted(here.glob("*/scale.json")):
    ratio = run.parent.name.split("-")[1]
    rows = {row["method"]: row["seconds"] for row in json.loads(run.read_text())["rows"]}
    spent = {m: s["calibration"] + s["factorisation"] for m, s in rows.items()}
    for method, seconds in spent.items():
        totals[ratio, method].append(seconds)
    ratios[ratio].append(spent["masa"] / spent["svd-llm"])
print("| ratio | svd-llm s (median) | masa s (median) | masa / svd-llm per round | median |")
print("|---|---:|---:|---|---:|")
for ratio, per_round in sorted(ratios.items()):
    svd, masa = statistics.median(totals[ratio, "svd-llm"]), statistics.median(totals[ratio, "masa"])
    rounds = ", ".join(f"{r:.2f}" for r in per_round)
    print(f"| {ratio} | {svd:.2f} | {masa:.2f} | {rounds} | **{statistics.median(per_round):.2f} x** |")

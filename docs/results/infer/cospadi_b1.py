"""CoSpaDi at decode batch 1: the index-gather path against the scatter path (dense code matrix + matmul).

    OMP_NUM_THREADS=1 python docs/results/infer/cospadi_b1.py /tmp/s3inf/bench/cospadi-{20,40,60}

Greedy generate of 32 tokens after a 16-token prompt, both paths interleaved, 3 rounds of process CPU
time after a warm-up round; medians.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import masa
from masa.nn.basis import SparseCodeLinear

gather_forward = SparseCodeLinear.forward


def scatter_forward(self, x):
    return F.linear(F.linear(x, self.shared.weight), self.codes(), self.bias)


def main() -> None:
    models = {name: masa.load(name) for name in sys.argv[1:]}
    prompt = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True, pad_token_id=0)
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for r in range(4):
            for name, model in models.items():
                for path, forward in (("gather", gather_forward), ("scatter", scatter_forward)):
                    SparseCodeLinear.forward = forward
                    start = time.process_time()
                    model.generate(prompt, **greedy)
                    if r:
                        times.setdefault((name, path), []).append(time.process_time() - start)
    SparseCodeLinear.forward = gather_forward
    for name in models:
        g, c = statistics.median(times[name, "gather"]), statistics.median(times[name, "scatter"])
        print(f"{name} decode b1: gather {g:.3f}s scatter {c:.3f}s -> scatter {g / c:.2f}x faster")


if __name__ == "__main__":
    main()

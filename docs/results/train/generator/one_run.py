"""Train and score one run of a `masa bench train` suite into its usual folder (the suite reuses it later).

Used for runs trained one by one rather than inside a suite command (which always trains dense as well):
    python one_run.py SUITE LABEL SEED PRESET SET...
e.g. the generator study's runs of seeds 1-2:
    python one_run.py generator masa-qkv-S4-plain 1 quick train.token_budget=163_840 \
        bench.eval_tokens=16_384 train.out_dir=runs/bench-generator
and the learning-rate sweep of the generator at the medium preset:
    python one_run.py table1 masa-qkvo-S4 0 medium train.lr_mult.generator=0.1 train.out_dir=runs/sweep-gen0.1
"""

import sys
from pathlib import Path

from masa.bench.command import resolve_train_preset
from masa.bench.train_suite import SuiteConfig, _scored_run, run_config, suite_runs, variant_config

if __name__ == "__main__":
    suite, label, seed, preset, sets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
    config = SuiteConfig.from_toml(resolve_train_preset(preset), sets)
    base = config.run.model_config(config.run.data.vocab_size)
    spec = next(s for s in suite_runs(suite, base.n_layer, config.bench.target_ratio) if s.label == label)
    model = variant_config(spec, base, config.bench.coef_generator)
    plain = spec.n_atoms and not model.coef_generator and spec.coef_generator is None
    folder = spec.label + ("-plain" if plain else "")  # the suite's folder for this run
    run_dir = Path(config.run.train.out_dir) / suite / folder / f"seed{seed}"
    record = _scored_run(run_config(config.run, model, seed, run_dir), config.bench)
    print(label, seed, record["held_out_ppl"], record["eval_ppl"], flush=True)

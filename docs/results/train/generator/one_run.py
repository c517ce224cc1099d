"""(Used for the masa-qkvo runs of seeds 1-2.) Train and score one run of the generator suite into its usual folder (the suite reuses it later)."""
import sys
from pathlib import Path

from masa.bench.command import resolve_train_preset
from masa.bench.train_suite import SuiteConfig, _scored_run, run_config, suite_runs, variant_config

if __name__ == "__main__":
    label, seed = sys.argv[1], int(sys.argv[2])
    sets = ["train.token_budget=163_840", "bench.eval_tokens=16_384", "train.out_dir=/work/wt-training/runs/bench-generator"]
    config = SuiteConfig.from_toml(resolve_train_preset("quick"), sets)
    base = config.run.model_config(config.run.data.vocab_size)
    spec = next(s for s in suite_runs("generator", base.n_layer, config.bench.target_ratio) if s.label == label)
    model = variant_config(spec, base, config.bench.coef_generator)
    run_dir = Path(config.run.train.out_dir) / "generator" / spec.label / f"seed{seed}"
    record = _scored_run(run_config(config.run, model, seed, run_dir), config.bench)
    print(label, seed, record["held_out_ppl"], record["eval_ppl"], flush=True)

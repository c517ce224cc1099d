"""``masa bench recovery``: bad options refused before any work; the report from a results file."""

from __future__ import annotations

import math

from masa import cli
from masa.bench.recovery import RESULTS_MD, write_report


def test_bad_options_name_the_fix(tmp_path, capsys):
    common = ["bench", "recovery", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    for extra, message in [
        (["--methods", "svd,svdd"], "--methods: unknown svdd; choose from"),
        (["--ratios", "0.2,1.5"], "--ratios: [1.5] not in (0, 1)"),
        (["--compensate", "eorb"], "unknown compensation"),
    ]:
        assert cli.main([*common, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_shows_the_split_and_the_like_with_like_ratio(tmp_path):
    def run(method, variant, ppl, share=None):
        record = {"method": method, "ratio": 0.4, "variant": variant, "ppl": ppl}
        if share is not None:
            tried = [{"share": s, "inner_ratio": 0.4 + s * 0.6, "criterion": 1.0, "calibration_loss": math.log(70 + s)}
                     for s in (0.0, 0.1)]  # fmt: skip
            record["eora"] = {"share": share, "inner_ratio": 0.46, "tried": tried}
        return record

    results = {
        "command": "masa bench recovery ...",
        "dense": {"ppl": 100.0, "protocol": "chunked"},
        "setup": {"config": {"compensate": "eora", "heal_steps": [], "ratios": [0.4]}},
        "runs": [
            run("svd-llm", "plain", 106.0),
            run("svd-llm", "eora", 102.0, 0.1),
            run("masa", "plain", 101.0),
            run("masa", "eora", 101.0, 0.0),
        ],  # fmt: skip
    }
    write_report(results, tmp_path)
    text = (tmp_path / RESULTS_MD).read_text()
    assert "| svd-llm | 40% | 0.10 | 0.460 | 70.000 | 70.100 | 0: 70.000 / 0.1: 70.100 |" in text
    assert "masa best training-free / svd-llm plain = 0.17; masa + EoRA / svd-llm + EoRA = 0.50" in text

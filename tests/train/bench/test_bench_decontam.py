"""Plumbing of `python -m train.bench.decontam` on a tiny workload (the figures themselves are not asserted)."""
import json

from train.bench.decontam import main


def test_decontam_bench_prints_mb_per_s_and_catches_the_planted_items(tmp_path, capsys):
    assert main(["--text-mb", "0.3", "--items", "50", "--repeats", "1", "--reference-docs", "20",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "MB/s per core" in out and "target >= 10.0" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["run_mb_s"] > 0 and r["check_batch_mb_s"] > 0 and r["reference_check_mb_s"] > 0
    planted = -(-r["documents"] // 50)  # every 50th document carries an item or a paraphrase of one
    assert r["totals"]["contaminated"] + r["totals"]["partial"] >= planted
    assert 0.5 < r["screened_out_share"] < 1  # most documents never reach the per-document check

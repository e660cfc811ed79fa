"""train.bench.docstate plumbing: the simulated source is a valid shard directory, and one rank's figures come back."""
from __future__ import annotations

import numpy as np

from data.shards import ShardedSource
from train.bench.docstate import MAX_DOC_TOKENS, child, format_row, synthetic_index_source


def test_simulated_source_and_one_rank_in_process(tmp_path):
    src = synthetic_index_source(tmp_path / "src", 5000)
    sharded = ShardedSource(src)  # size checks and the strictly increasing index pass
    lengths = sharded.doc_lengths()
    assert sharded.num_docs == 5000 and lengths.min() >= 1 and lengths.max() <= MAX_DOC_TOKENS
    assert (src / "shard_00000.bin").stat().st_size == 4 * int(lengths.sum())
    assert np.all(sharded.doc(4999) == 0)  # sparse tokens read as zeros
    rows = {mode: child(mode, str(src), str(tmp_path / "state")) for mode in ("old", "new")}
    assert list((tmp_path / "state").glob("*/meta.json"))  # the new path built its state
    for r in rows.values():
        assert r["init_s"] >= 0 and r["boundary_ms"] > 0 and r["peak_mib"] > 0
    line = format_row({"docs": 5000, "old": rows["old"], "build": rows["new"], "rank": rows["new"],
                       "state_disk_mib": 0.1})
    assert line.split("|")[0].strip() == "5e+03"

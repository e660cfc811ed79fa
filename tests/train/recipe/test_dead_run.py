"""train/recipe/runner.py dead_run: a trainer that recorded "running" and died without a word is reported."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from train.recipe.runner import dead_run


def _status(run_dir, **record):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "exit_status.json").write_text(json.dumps({"status": "running", "step": 0, **record}))


def test_a_running_record_whose_process_is_gone_is_reported(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # exited and reaped: no such process now
    _status(tmp_path / "dead", host=socket.gethostname(), pid=pid)
    message = dead_run(tmp_path / "dead")
    assert "says running" in message and str(pid) in message and "died without recording why" in message
    _status(tmp_path / "alive", host=socket.gethostname(), pid=os.getpid())
    assert dead_run(tmp_path / "alive") == ""
    _status(tmp_path / "elsewhere", host="another-node", pid=pid)  # another host: its pids mean nothing here
    assert dead_run(tmp_path / "elsewhere") == ""
    _status(tmp_path / "finished", host=socket.gethostname(), pid=pid)
    (tmp_path / "finished" / "exit_status.json").write_text(json.dumps({"status": "completed", "step": 4}))
    assert dead_run(tmp_path / "finished") == "" and dead_run(tmp_path / "missing") == ""

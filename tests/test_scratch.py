"""Scratch folders of killed processes: the next folder of the same kind removes them, and nothing else.

Real processes: a child SIGKILLed after making its folder, a live child, a live child whose pid a stale folder
names with another start time (a reused pid).
"""

from __future__ import annotations

import subprocess
import sys

from aigis.scratch import OWNER_FILE, owned_tempdir, process_start_time, remove_abandoned

MAKE_AND_DIE = ("import os, sys; from aigis.scratch import owned_tempdir; "
                "print(owned_tempdir('aigis-t-', sys.argv[1]), flush=True); os.kill(os.getpid(), 9)")


def test_the_folders_of_killed_owners_go_and_the_others_stay(tmp_path):
    killed = subprocess.run([sys.executable, "-c", MAKE_AND_DIE, str(tmp_path)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    abandoned = tmp_path / killed.stdout.strip().rsplit("/", 1)[1]
    (abandoned / "model").mkdir()
    (abandoned / "model" / "weights.onnx").write_bytes(b"x" * 1000)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / "aigis-t-live"
        live.mkdir()
        (live / OWNER_FILE).write_text(f"{sleeper.pid} {process_start_time(sleeper.pid)}\n")
        reused = tmp_path / "aigis-t-reused"        # the same pid, another process start: its owner is gone
        reused.mkdir()
        (reused / OWNER_FILE).write_text(f"{sleeper.pid} 1\n")
        unknown = tmp_path / "aigis-t-unknown"      # no owner file: made by something else, left alone
        unknown.mkdir()
        other_kind = tmp_path / "other-prefix"
        other_kind.mkdir()
        (other_kind / OWNER_FILE).write_text("999999999 1\n")

        mine = owned_tempdir("aigis-t-", tmp_path)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert abandoned.name not in left and "aigis-t-reused" not in left
        assert {"aigis-t-live", "aigis-t-unknown", "other-prefix", mine.name} <= set(left)
        assert remove_abandoned("aigis-t-", tmp_path) == []      # this process's own folder is never removed
        assert mine.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [p.name for p in remove_abandoned("aigis-t-", tmp_path)] == ["aigis-t-live"]

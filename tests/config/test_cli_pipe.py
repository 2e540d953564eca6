"""A closed stdout pipe (`tokenmill ... | head -1`) ends the command quietly, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def test_closed_pipe_ends_quietly(tmp_path):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the reader is gone before the first write, as after `head -1` has exited
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmill", "config", "show"],
        stdout=write_fd,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    os.close(write_fd)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == ""
    assert proc.returncode == 1

"""``services`` state handling that needs no running service: a stale pid file is never trusted."""

from __future__ import annotations

import os
import subprocess
import sys

from streamscore.infra.services import MlflowService, _start_time


def test_a_stale_pid_file_naming_another_process_is_ignored_and_nothing_is_signalled(tmp_path):
    # another process, leading its own group as a service would: only its start time differs
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        svc = MlflowService(tmp_path, 1)
        svc.dir.mkdir(parents=True)
        for content in (f"{other.pid}\n", f"{other.pid} 12345\n"):  # no start time / a wrong one
            svc.pid_file.write_text(content)
            assert svc.pid() is None
            assert svc.stop()["action"] == "not running"
            assert other.poll() is None  # not signalled
        svc.pid_file.write_text(f"{other.pid} {_start_time(other.pid)}\n")
        assert svc.pid() == other.pid  # the genuine record is trusted
        assert svc.stop(timeout=10)["action"] == "stopped"
        assert other.wait(10) is not None
    finally:
        if other.poll() is None:
            other.kill()


def test_a_pid_file_naming_a_process_that_is_not_a_group_leader_is_ignored(tmp_path):
    # a process in the caller's own group: stopping "its group" would signal the caller
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert os.getpgid(child.pid) != child.pid
        svc = MlflowService(tmp_path, 1)
        svc.dir.mkdir(parents=True)
        svc.pid_file.write_text(f"{child.pid} {_start_time(child.pid)}\n")
        assert svc.pid() is None and svc.stop()["action"] == "not running"
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(10)

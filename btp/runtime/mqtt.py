"""MQTT out: each scan's message published with QoS 1 (at least once) by paho-mqtt.

    sink = MqttSink("broker.local:1883", "line1/btp")
    sink({"verdict": "OK", ...})     # returns once the broker acknowledged it (PUBACK), or raises

paho-mqtt comes with the ``line`` extra (pip install 'btp-edge[line]'). The client connects and
reconnects by itself; while it is not connected, or when the broker did not acknowledge within
``timeout_s``, a call raises, so the caller keeps the message for a later try. Torch-free.
"""
from __future__ import annotations

import json
from typing import Any

from btp.errors import BTPError

DEFAULT_PORT = 1883


class MqttError(BTPError):
    """The MQTT broker cannot be used (the message names it and the fix)."""


def parse_broker(text: str) -> tuple[str, int]:
    """HOST[:PORT] -> (host, port); [v6-address]:PORT is accepted too."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise MqttError(f"--mqtt {text!r}: the port must be a number from 1 to 65535 (HOST[:PORT])") from None
    if not host:
        raise MqttError(f"--mqtt {text!r}: no host; give HOST[:PORT], e.g. localhost:1883")
    return host, port


class MqttSink:
    """Publishes to ``topic`` on ``broker`` (HOST[:PORT]). The connection is made in the
    background and remade whenever it drops (retries every 1 to ``max_retry_s`` seconds), so the
    service starts and scores while the broker is down; until it is up, each call raises at once
    and the caller keeps the message. ``log``: one line per change of the connection's state."""

    def __init__(self, broker: str, topic: str, *, client_id: str = "", timeout_s: float = 10.0,
                 keepalive_s: int = 30, max_retry_s: int = 5, log=None) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise MqttError("--mqtt needs paho-mqtt: pip install 'btp-edge[line]'") from None
        if not topic or any(c in topic for c in "#+"):
            raise MqttError(f"--topic {topic!r}: give a topic name without wildcards, e.g. line1/btp")
        self.host, self.port = parse_broker(broker)
        self.topic, self.timeout_s = topic, timeout_s
        self._log = log or (lambda text: None)
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=not client_id)
        self._client.reconnect_delay_set(min_delay=1, max_delay=max_retry_s)
        self._client.on_connect = lambda c, u, flags, rc, props: self._log(
            f"MQTT broker {self.host}:{self.port}: " + ("connected" if not rc.is_failure else f"refused ({rc})"))
        self._client.on_disconnect = lambda c, u, flags, rc, props: self._log(
            f"MQTT broker {self.host}:{self.port}: disconnected ({rc}); retrying")
        try:
            self._client.connect_async(self.host, self.port, keepalive=keepalive_s)
        except (OSError, ValueError) as exc:
            raise MqttError(f"--mqtt {broker}: {exc}") from None
        self._client.loop_start()

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the client is connected within ``timeout_s`` seconds."""
        import time

        deadline = time.monotonic() + timeout_s
        while not self._client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._client.is_connected()

    def __call__(self, msg: dict[str, Any]) -> None:
        if not self._client.is_connected():
            raise MqttError(f"not connected to the MQTT broker {self.host}:{self.port}")
        info = self._client.publish(self.topic, json.dumps(msg, allow_nan=False), qos=1)
        info.wait_for_publish(timeout=self.timeout_s)
        if not info.is_published():
            raise MqttError(f"the broker {self.host}:{self.port} did not acknowledge within {self.timeout_s:g} s")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

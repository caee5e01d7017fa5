"""MQTT out: each scan's message published with QoS 1 (at least once) by paho-mqtt.

    sink = MqttSink("broker.local:1883", "line1/btp")
    sink({"verdict": "OK", ...})     # returns once the broker acknowledged it (PUBACK), or raises

paho-mqtt comes with the ``line`` extra (pip install 'btp-edge[line]'). The client reconnects by
itself; a message the broker did not acknowledge within ``timeout_s`` raises, so the caller keeps
it for a later try. Torch-free.
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
    def __init__(self, broker: str, topic: str, *, client_id: str = "", timeout_s: float = 10.0,
                 keepalive_s: int = 30) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise MqttError("--mqtt needs paho-mqtt: pip install 'btp-edge[line]'") from None
        if not topic or any(c in topic for c in "#+"):
            raise MqttError(f"--topic {topic!r}: give a topic name without wildcards, e.g. line1/btp")
        self.host, self.port = parse_broker(broker)
        self.topic, self.timeout_s = topic, timeout_s
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
                                   if client_id else True)
        try:
            self._client.connect(self.host, self.port, keepalive=keepalive_s)
        except OSError as exc:
            raise MqttError(f"--mqtt {broker}: cannot connect to the broker ({exc}); is it running and reachable?") \
                from None
        self._client.loop_start()

    def __call__(self, msg: dict[str, Any]) -> None:
        info = self._client.publish(self.topic, json.dumps(msg, allow_nan=False), qos=1)
        info.wait_for_publish(timeout=self.timeout_s)
        if not info.is_published():
            raise MqttError(f"the broker {self.host}:{self.port} did not acknowledge within {self.timeout_s:g} s")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

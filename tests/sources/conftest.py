"""Fixtures of the device-source tests; the peers themselves live in peers.py."""

from tests.sources.peers import mosquitto, socat_pair

__all__ = ["mosquitto", "socat_pair"]

"""Participants over HTTP: the demo services behind real endpoints, and the
contract check that probes any participant the way the engine calls it."""

from __future__ import annotations

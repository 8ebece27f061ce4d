"""The attention methods ``benchmarks/attention.py`` compares, one module each, by name."""

from __future__ import annotations

from . import dense, megatron_sp, mqsp, ring, rsa, ulysses
from .common import Method

#: Every method by name, MQSP first.
METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (mqsp, dense, rsa, megatron_sp, ring, ulysses)}

__all__ = ["METHODS", "Method"]

"""The attention methods ``benchmarks/attention.py`` compares, one module each, by name."""

from __future__ import annotations

from . import dense, megatron_sp, mqsp, ring, rsa, ulysses
from .common import Method

#: Every method by name, MQSP first.
METHODS: dict[str, Method] = {
    m.name: m for m in (mqsp.METHOD, mqsp.CONTIGUOUS, dense.METHOD, rsa.METHOD, megatron_sp.METHOD, ring.METHOD, ulysses.METHOD)
}

__all__ = ["METHODS", "Method"]

"""The local stack's settings for tests; the function lives in stack.config (benchmarks use it too)."""

from stack.config import free_port_config

__all__ = ["free_port_config"]

"""``saekit demo``: the whole path (cache, train, score, report) on the testbed's shipped models."""

from .config import DemoConfig
from .run import run_demo

__all__ = ["DemoConfig", "run_demo"]

"""Where a router's agent keeps its socket, pid and lock: what the client
needs of the agent, without loading it."""
from __future__ import annotations

from pathlib import Path

from ..datapath import RUN_ROOT


def socket_path(name: str) -> Path:
    return RUN_ROOT / name / "agent.sock"


def pid_path(name: str) -> Path:
    return RUN_ROOT / name / "agent.pid"


def lock_path(name: str) -> Path:
    return RUN_ROOT / name / "agent.lock"


class AgentRunning(Exception):
    """Another agent already writes this router's maps."""

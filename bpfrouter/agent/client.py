"""Client side of the agent's Unix-socket API, and agent process control."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from ..datapath import RUN_ROOT
from .paths import pid_path, socket_path


class AgentUnavailable(Exception):
    pass


def request(name: str, op: str, timeout: float = 30.0, **fields) -> dict:
    path = socket_path(name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise AgentUnavailable(f"the agent of router {name!r} is not running: "
                               f"start it with `bpfrouter agent start --name {name}`") from None
    except socket.timeout:
        raise AgentUnavailable(f"the agent of router {name!r} did not answer within {timeout:.0f} s") from None
    return json.loads(data)


def agent_pid(name: str) -> int | None:
    try:
        pid = int(pid_path(name).read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"bpfrouter" not in f.read():
                return None
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def log_path(name: str):
    return RUN_ROOT / name / "agent.log"


def start_agent(name: str, netns_name: str | None, timeout: float = 300.0, progress=None) -> int:
    """Start the agent in the background and wait until it has synced.
    progress(ping answer) is called while it syncs."""
    if (pid := agent_pid(name)) is not None:
        return pid
    logf = open(log_path(name), "ab")
    cmd = [sys.executable, "-m", "bpfrouter"]
    if netns_name:
        cmd += ["--netns", netns_name]
    cmd += ["agent", "run", "--name", name]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                            start_new_session=True, close_fds=True)
    logf.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AgentUnavailable(f"the agent exited at start (code {proc.returncode}); "
                                   f"see {log_path(name)}")
        try:
            answer = request(name, "ping", timeout=2)
            if answer.get("ready"):
                return proc.pid
            if progress:
                progress(answer)
        except (AgentUnavailable, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AgentUnavailable(f"the agent did not become ready within {timeout:.0f} s; see {log_path(name)}")


def _alive(pid: int) -> bool:
    """Whether the process still runs (a zombie has exited and dropped its locks)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_agent(name: str, timeout: float = 10.0) -> bool:
    """Stop the agent and wait until its process is gone: until then it holds
    the agent lock, and an agent started at once would be refused."""
    pid = agent_pid(name)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    return True

"""Network namespace helpers (setns through libc; `ip netns exec` would
remount /sys and hide bpffs, so only the network namespace is entered)."""
from __future__ import annotations

import ctypes
import os

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    pass


def path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def enter(name: str) -> None:
    """Move the calling thread into network namespace `name`, or into the
    namespace file at an absolute path (/proc/PID/ns/net)."""
    try:
        fd = os.open(name if name.startswith("/") else path(name), os.O_RDONLY)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist (see `ip netns list`)") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def current_name() -> str | None:
    """Name of the named namespace this thread is in, or None (host or unnamed)."""
    me = os.stat("/proc/thread-self/ns/net")
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return None
    for n in names:
        try:
            st = os.stat(path(n))
        except OSError:
            continue
        if st.st_ino == me.st_ino and st.st_dev == me.st_dev:
            return n
    return None


def command_prefix(name: str | None) -> list[str]:
    """argv prefix that runs a command in netns `name` without remounting /sys."""
    return ["nsenter", f"--net={path(name)}"] if name else []


def run_in(name: str, fn, *args):
    """Run fn(*args) in a thread that entered namespace `name`; return its result."""
    import threading
    box: dict = {}

    def target():
        try:
            enter(name)
            box["result"] = fn(*args)
        except BaseException as e:  # handed back to the caller
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is `name`."""
    try:
        target = os.stat(path(name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
            pids.append(int(entry))
    return pids


class entered:
    """Context manager: run the calling thread in namespace `name`, then return."""

    def __init__(self, name: str):
        self.name = name
        self._orig = -1

    def __enter__(self):
        self._orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        enter(self.name)
        return self

    def __exit__(self, *exc):
        try:
            if _libc.setns(self._orig, CLONE_NEWNET) != 0:
                raise NetnsError(f"cannot return to the original namespace: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(self._orig)

"""The sd_notify protocol: readiness, status and watchdog datagrams to systemd.

Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op returning False, so
the daemon calls these unconditionally. See sd_notify(3).
"""

from __future__ import annotations

import os
import socket

__all__ = ["enabled", "notify", "ready", "status", "stopping", "watchdog", "watchdog_interval"]


def _address(raw: str) -> str | bytes:
    # "@name" is a Linux abstract socket: the address starts with a NUL byte.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(message: str) -> bool:
    """Send newline-separated KEY=VALUE lines; False when not under systemd or undeliverable.

    Never raises: a lost notification must not take the daemon down with it.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or raw[0] not in "/@":  # vsock: and other transports are not supported
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), _address(raw))
    except OSError:
        return False
    return True


def enabled() -> bool:
    """True when running under systemd with a notification socket."""
    raw = os.environ.get("NOTIFY_SOCKET") or ""
    return raw[:1] in ("/", "@")


def ready() -> bool:
    """Tell systemd start-up is complete (Type=notify units become active)."""
    return notify("READY=1")


def stopping() -> bool:
    """Tell systemd a graceful shutdown has begun."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the one-line status shown by `systemctl status`."""
    return notify("STATUS=" + text.replace("\n", " "))


def watchdog() -> bool:
    """Ping the service watchdog (WatchdogSec=)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec=), or None if no watchdog is on.

    $WATCHDOG_PID, when set, must name this process: a child inheriting the
    environment must not ping on its parent's behalf.
    """
    try:
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000

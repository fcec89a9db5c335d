"""A proxy.py plugin for tests/test_network.py: the proxy connects upstream from the
source address in $BATCHD_TEST_PROXY_SOURCE (what tinyproxy's `Bind` or squid's
`tcp_outgoing_address` do), so the emulator can tell its connections from direct ones."""

from __future__ import annotations

import os

from proxy.http.proxy import HttpProxyBasePlugin


class OutgoingFrom(HttpProxyBasePlugin):  # type: ignore[misc]
    """Bind every upstream connection to $BATCHD_TEST_PROXY_SOURCE."""

    def resolve_dns(self, host: str, port: int) -> tuple[str | None, tuple[str, int] | None]:
        """Default name resolution; a fixed source address."""
        return None, (os.environ["BATCHD_TEST_PROXY_SOURCE"], 0)

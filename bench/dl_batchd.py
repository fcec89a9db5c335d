"""batchd's side of bench.download: what the collect stage does with one result file, in
its own process: `BatchApi.download` (temp name, length check, fsync, rename) with the
lines counted and their custom_ids indexed as the bytes arrive, then the count checked
against the batch's request_counts.

    python -m bench.dl_batchd BASE_URL FILE_ID DEST EXPECTED_LINES

Prints one JSON line: seconds (from the request to the verified, renamed file), bytes,
lines, and proxy (the proxy the client went through, if any).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from batchd.api import BatchApi, Lines
from batchd.config import ApiConfig
from batchd.metrics import Metrics
from batchd.stages.collect import custom_id_of


async def _run(base_url: str, file_id: str, dest: Path, expected: int) -> dict[str, Any]:
    cfg = ApiConfig(base_url=base_url, max_retries=1)
    ids: set[str] = set()
    lines = Lines(lambda line: ids.add(custom_id_of(line)))
    async with BatchApi(cfg, os.environ["BENCH_API_KEY"], Metrics()) as api:
        t = time.perf_counter()
        n = await api.download(file_id, dest, lines)
        if lines.count < expected or len(ids) != lines.count:
            raise SystemExit(f"short download: {lines.count} lines, {len(ids)} ids")
        return {
            "seconds": time.perf_counter() - t,
            "bytes": n,
            "lines": lines.count,
            "proxy": api.proxy,
        }


def main() -> int:
    """Download and print the timing."""
    base_url, file_id, dest, expected = sys.argv[1:5]
    result = asyncio.run(_run(base_url, file_id, Path(dest), int(expected)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

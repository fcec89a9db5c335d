"""batchd's side of bench.download: `BatchApi.download` of one file, in its own process.

    python -m bench.dl_batchd BASE_URL FILE_ID DEST

Prints one JSON line: seconds (session open, start-up excluded) and bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from batchd.api import BatchApi
from batchd.config import ApiConfig
from batchd.metrics import Metrics


async def _run(base_url: str, file_id: str, dest: Path) -> dict[str, float]:
    cfg = ApiConfig(base_url=base_url, max_retries=1)
    async with BatchApi(cfg, os.environ["BENCH_API_KEY"], Metrics()) as api:
        t = time.perf_counter()
        n = await api.download(file_id, dest)
        return {"seconds": time.perf_counter() - t, "bytes": n}


def main() -> int:
    """Download and print the timing."""
    base_url, file_id, dest = sys.argv[1:4]
    print(json.dumps(asyncio.run(_run(base_url, file_id, Path(dest)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

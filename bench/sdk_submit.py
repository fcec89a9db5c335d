"""Baseline: the script a user would write on the official `openai` SDK.

    python -m bench.sdk_submit FILE... --base-url URL [--validate] [--poll SECONDS]

For each file in turn: optionally check every line with `json.loads`, then upload
it (`files.create`, streamed from the open file) and create the batch. With --poll
it then polls `batches.retrieve` until the last batch ends. Prints one JSON line:
seconds from start to the last batch being created (imports and client
construction excluded), and the batch ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    """Run the user's script; print {"seconds": …, "batch_ids": […], "status": …}."""
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--base-url", required=True)
    p.add_argument("--validate", action="store_true", help="json.loads every line first")
    p.add_argument("--poll", type=float, help="poll retrieve() every N s until the batch ends")
    a = p.parse_args()

    from openai import OpenAI

    client = OpenAI(api_key=os.environ["BENCH_API_KEY"], base_url=a.base_url, max_retries=2)
    start = time.perf_counter()
    ids = []
    for path in a.files:
        if a.validate:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or "custom_id" not in obj:
                        sys.exit(f"{path}:{n}: not a request")
        with open(path, "rb") as f:
            up = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(
            input_file_id=up.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        ids.append(batch.id)
    created = time.perf_counter() - start
    if a.poll:
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(a.poll)
            batch = client.batches.retrieve(batch.id)
    print(json.dumps({"seconds": created, "batch_ids": ids, "status": batch.status}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

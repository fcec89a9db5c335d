"""The OpenAI SDK through batchd's facade: a file over the API's 200 MB per-batch limit.

    python -m bench.facade [--smoke] [--mb N]

The user's script (official SDK): `uploads.upload_file_chunked` (64 MB parts), then
`batches.create`, `retrieve` every 50 ms until the end, `files.content` of the output.
batchd: the script pointed at the daemon's facade (one logical batch, split upstream);
baseline: the same script pointed at the emulator, which refuses a batch over 200 MB as
the API does. Figures: the script's wall time, the daemon's peak RSS.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import openai

from bench.common import (
    API_KEY,
    Daemon,
    Emulator,
    PeakRss,
    Row,
    chat_file,
    mb,
    parser,
    print_table,
    workdir,
)

KEY = "sk-bench-facade-tenant-0123456789"
RSS_LIMIT = 100e6


def run_script(client: openai.OpenAI, src: Path) -> tuple[float, str]:
    """The user's script: (seconds, outcome)."""
    t0 = time.perf_counter()
    try:
        up = client.uploads.upload_file_chunked(
            file=src, mime_type="text/jsonl", purpose="batch", part_size=64 * 1024 * 1024
        )
        assert up.file is not None
        b = client.batches.create(
            input_file_id=up.file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while b.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.05)
            b = client.batches.retrieve(b.id)
    except openai.APIStatusError as e:
        return time.perf_counter() - t0, f"refused ({e.status_code}: {e.param or e.code})"
    if b.status != "completed" or b.output_file_id is None:
        return time.perf_counter() - t0, f"{b.status}: {b.errors}"
    lines = client.files.content(b.output_file_id).content.count(b"\n")
    rc = b.request_counts
    assert rc is not None
    return time.perf_counter() - t0, f"completed, {lines} of {rc.total} results"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mb", type=int, help="input size in MB (default 300; smoke 3)")
    a = p.parse_args()
    size = (a.mb or (3 if a.smoke else 300)) * 1_000_000
    with workdir("facade") as work:
        src = work / "big.jsonl"
        total = chat_file(src, max(1, size // 3000), size)
        (work / "alpha.key").write_text(KEY + "\n")
        digest = hashlib.sha256(KEY.encode()).hexdigest()
        with Emulator(time_scale=0.01) as emu:
            sections = {"facade.tenants.alpha": {"key_sha256": digest}}
            with Daemon(work / "d", emu.url, batch={"poll_interval_seconds": 0.2}, **sections) as d:
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key=KEY)
                with PeakRss(d.proc.pid) as rss:
                    ours, outcome = run_script(client, src)
            direct = openai.OpenAI(base_url=emu.url, api_key=API_KEY)
            theirs, refused = run_script(direct, src)
    print_table(
        f"The SDK's script on a {mb(total)} file",
        [
            Row("script wall time", f"{ours:.1f} s", f"{theirs:.1f} s", "-", "-", None),
            Row("outcome", outcome, refused, "-", "one completed batch", "completed" in outcome),
            Row(
                "daemon peak RSS",
                mb(rss.peak),
                "-",
                "-",
                f"<= {mb(RSS_LIMIT)}",
                rss.peak <= RSS_LIMIT,
            ),
        ],
        ["batchd: the daemon's facade; baseline: the emulator directly (the API's limits)."],
    )


if __name__ == "__main__":
    main()

"""Big download: a ~200 MB batch output file, batchd's streamed download vs curl.

    python -m bench.download [--smoke] [--reps N]

The emulator pads every result line (`--output-pad-bytes`) so a 2,000-request batch
has a ~200 MB output file. batchd's side is `BatchApi.download` in its own process
(streamed to a temp name, length-checked, fsynced, renamed); the baseline is `curl -o`
on the same URL (no fsync). Throughput = bytes / seconds (curl's own time_total; the
downloader's time from the request to the renamed file). A second baseline is curl
followed by an fsync of its file, i.e. as durable as batchd's. Peak RSS of each
process tree. Sides alternate; medians. Target: batchd >= 0.8x curl, <= 80 MB.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from batchd.api import BatchApi
from batchd.config import ApiConfig
from batchd.metrics import Metrics
from bench.common import (
    API_KEY,
    PY,
    Emulator,
    Row,
    Script,
    mb,
    median,
    parser,
    print_table,
    small_chat,
    workdir,
)


async def _make_output(url: str, requests: int, tmp: Path) -> tuple[str, int]:
    """Submit a batch of `requests` lines, wait for it to complete; its output file."""
    src = tmp / "in.jsonl"
    src.write_bytes(small_chat(requests))
    async with BatchApi(ApiConfig(base_url=url), API_KEY, Metrics()) as api:
        f = await api.upload_file(src, "in.jsonl")
        b = await api.create_batch(f["id"], "/v1/chat/completions", "24h", {})
        for _ in range(6000):
            b = await api.get_batch(b["id"])
            if b["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert b["status"] == "completed", b["status"]
        return str(b["output_file_id"]), 0


def main() -> int:
    """Run and print the table."""
    p = parser(__doc__)
    p.add_argument("--reps", type=int, help="downloads per side (default 5; smoke 1)")
    a = p.parse_args()
    reps = a.reps or (1 if a.smoke else 5)
    requests, pad = (200, 10_000) if a.smoke else (2000, 100_000)
    curl = shutil.which("curl")
    ours: list[float] = []
    theirs: list[float] = []
    durable: list[float] = []
    rss_ours: list[int] = []
    rss_theirs: list[int] = []
    size = 0
    with (
        workdir("download") as tmp,
        Emulator("--output-pad-bytes", str(pad), time_scale=0.001) as emu,
    ):
        file_id, _ = asyncio.run(_make_output(emu.url, requests, tmp))
        url = f"{emu.url}/files/{file_id}/content"
        for i in range(reps):
            for side in ("batchd", "curl") if i % 2 == 0 else ("curl", "batchd"):
                dest = tmp / f"out-{side}-{i}.jsonl"
                if side == "batchd":
                    s = Script([PY, "-m", "bench.dl_batchd", emu.url, file_id, str(dest)]).run()
                    size = int(s.result["bytes"])
                    ours.append(size / float(s.result["seconds"]))
                    rss_ours.append(s.peak_rss)
                elif curl:
                    s = Script(
                        [
                            curl,
                            "-sS",
                            "-o",
                            str(dest),
                            "-H",
                            f"Authorization: Bearer {API_KEY}",
                            "-w",
                            '{"seconds": %{time_total}}\\n',
                            url,
                        ]
                    ).run()
                    t = time.perf_counter()
                    fd = os.open(dest, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                    synced = float(s.result["seconds"]) + time.perf_counter() - t
                    theirs.append(dest.stat().st_size / float(s.result["seconds"]))
                    durable.append(dest.stat().st_size / synced)
                    rss_theirs.append(s.peak_rss)
                dest.unlink(missing_ok=True)
    b, c = median(ours), median(theirs)
    rows = [
        Row(
            f"throughput, {mb(size)} output file (MB/s)",
            f"{b / 1e6:.0f}",
            f"{c / 1e6:.0f}" if theirs else "no curl",
            f"{b / c:.2f}x" if c else "-",
            ">= 0.8x",
            b >= 0.8 * c if c else None,
        ),
        Row(
            "throughput vs curl + fsync of its file (MB/s)",
            f"{b / 1e6:.0f}",
            f"{median(durable) / 1e6:.0f}" if durable else "no curl",
            f"{b / median(durable):.2f}x" if durable else "-",
            "-",
            None,
        ),
        Row(
            "peak RSS, process tree",
            mb(max(rss_ours)),
            mb(max(rss_theirs)) if rss_theirs else "-",
            f"{max(rss_ours) / max(rss_theirs):.2f}x" if rss_theirs else "-",
            "batchd <= 80 MB",
            max(rss_ours) <= 80e6,
        ),
    ]
    notes = [
        f"{reps} download(s) per side, alternating; medians. batchd (MB/s): "
        f"{[round(x / 1e6) for x in ours]}; curl: {[round(x / 1e6) for x in theirs]}; "
        f"curl + fsync: {[round(x / 1e6) for x in durable]}",
        "batchd's time includes its fsync and rename; curl's does not fsync",
    ]
    print_table("Big download (bench.download)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-job batch metadata given over HTTP, kept in a sidecar next to the job's results.

The sidecar lives in the job's staging dir (`processing/JOB.d/metadata.json`), so it
is published with the results into `done/NAME/` or `failed/NAME/` by the same rename.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:  # config imports the limits below: keep this module light
    from batchd.spool import Spool
    from batchd.store import Job

FILENAME = "metadata.json"
RESERVED_PREFIX = "batchd_"
API_MAX_PAIRS = 16  # the Batch API's limit on metadata pairs
BATCHD_PAIRS = 2  # batchd_job and batchd_attempt


class InvalidMetadata(ValueError):
    """Metadata that is not an object of short strings, or would not fit in a batch."""


def check(meta: object, fixed: Mapping[str, str]) -> dict[str, str]:
    """Validate user metadata against the API's rules, leaving room for `fixed` and batchd's."""
    if not isinstance(meta, dict):
        raise InvalidMetadata("metadata must be a JSON object of strings")
    room = API_MAX_PAIRS - BATCHD_PAIRS - len(fixed)
    if len(meta) > room:
        raise InvalidMetadata(f"metadata: at most {room} pairs (the rest are configured)")
    for k, v in meta.items():
        if not isinstance(k, str) or not k or len(k) > 64:
            raise InvalidMetadata(f"metadata key {k!r}: 1..64 characters")
        if k.startswith(RESERVED_PREFIX):
            raise InvalidMetadata(f"metadata key {k!r}: the prefix {RESERVED_PREFIX} is reserved")
        if not isinstance(v, str) or len(v) > 512:
            raise InvalidMetadata(f"metadata.{k}: a string of at most 512 characters")
    return dict(meta)


def write(spool: Spool, job_id: str, meta: Mapping[str, str]) -> None:
    """Write the sidecar before the job record exists, so submit always sees it."""
    from batchd.spool import write_json

    write_json(spool.staging(job_id) / FILENAME, dict(meta))


def read(spool: Spool, job: Job) -> dict[str, str]:
    """The job's HTTP metadata ({} when none): from staging, else from its result dir."""
    candidates = [spool.processing / f"{job.id}.d" / FILENAME]
    if job.result_dir:
        candidates.append(spool.path(job.result_dir) / FILENAME)
    for path in candidates:
        try:
            data = orjson.loads(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            continue
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    return {}

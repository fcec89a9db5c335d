"""The spool directory tree: claim from inbox/, atomic moves, result placement.

Every move is a rename(2) inside one filesystem, followed by an fsync of the
directories involved, so a file is always in exactly one place across a crash.
A job's results are assembled in `processing/JOB.d/` and published into
`done/NAME/` or `failed/NAME/` by one directory rename.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from ulid import ULID

from batchd.errors import StartupError

SUFFIX = ".jsonl"
_SEP = "--"
_PROVIDER = "~"  # processing/JOB~PROVIDER--NAME.jsonl: the provider survives a crash
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
# What intake takes (case-insensitive): plain JSONL under either usual name, or compressed
# (decompressed while streaming before validation). -> the suffix it has in processing/.
INPUT_SUFFIXES: dict[str, str] = {
    ".jsonl": ".jsonl",
    ".ndjson": ".jsonl",
    ".jsonl.gz": ".jsonl.gz",
    ".ndjson.gz": ".jsonl.gz",
    ".jsonl.zst": ".jsonl.zst",
    ".ndjson.zst": ".jsonl.zst",
}
COMPRESSED = (".jsonl.gz", ".jsonl.zst")
_IN_PROGRESS = (".part", ".tmp", ".swp", "~")
F_SETLEASE, F_RDLCK, F_UNLCK = 1024, 0, 2  # <fcntl.h> (Linux)


def check_name(name: str) -> str:
    """A job NAME as given (`batchd submit`, the HTTP queue): a trailing `.jsonl` is
    dropped, the rest must be `[A-Za-z0-9._-]{1,100}` and must not start with `.`
    (intake ignores dot files: such a file would never be taken). Raises ValueError."""
    stem = name.removesuffix(SUFFIX)
    if not NAME_RE.fullmatch(stem) or stem.startswith("."):
        rule = "1..100 of A-Z a-z 0-9 . _ -, not starting with '.'"
        raise ValueError(f"invalid name {name!r}: {rule}")
    return stem


def input_suffix(name: str) -> str | None:
    """The accepted suffix `name` ends with (as written), or None."""
    low = name.lower()
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[len(name) - len(suffix) :]
    return None


def is_candidate(name: str) -> bool:
    """An input file to take: an accepted suffix, not a dot file (dot files and
    `.part`/`.tmp` names are being written)."""
    return not name.startswith(".") and input_suffix(name) is not None


def ignored_why(name: str, is_dir: bool) -> str | None:
    """Why an inbox entry that is not a candidate will never be taken (None for files
    that are being written by convention: dot files, `.part`, `.tmp`, …)."""
    base = name.rpartition("/")[2]
    if base.startswith(".") or base.endswith(_IN_PROGRESS):
        return None
    if is_dir:
        return (
            "a directory that names no configured provider (only files directly in "
            "inbox/ or in inbox/PROVIDER/ are taken)"
        )
    return "not a .jsonl, .ndjson, .jsonl.gz or .jsonl.zst file"


def _job_part(part: str) -> tuple[str, str | None]:
    """(job id, provider) of the `JOB` or `JOB~PROVIDER` part of a processing/ name."""
    job_id, sep, provider = part.partition(_PROVIDER)
    return job_id, (provider or None) if sep else None


def no_writer(path: Path) -> bool | None:
    """True when no process has the file open for writing; None when this cannot be told
    here (a file system without leases, or a file owned by another user without
    CAP_LEASE). A read lease is refused (EAGAIN) while any writer holds the file open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, F_SETLEASE, F_RDLCK)
    except OSError as e:
        return False if e.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
        return True
    finally:
        os.close(fd)


def fingerprint(path: Path) -> str:
    """Size, modification time and inode: changes whenever the file is written."""
    st = os.stat(path, follow_symlinks=False)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename into place, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: object) -> None:
    """Atomically write pretty JSON."""
    write_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")


@dataclass(frozen=True)
class Claimed:
    """A file moved from inbox/ into processing/ under a new job id."""

    job_id: str
    name: str  # the NAME as dropped (file name without its suffix)
    rel_path: str
    provider: str | None = None  # dropped into inbox/PROVIDER/ (None: into inbox/)


@dataclass(frozen=True)
class Entry:
    """A file waiting in inbox/ (`name` is relative to it: `x.jsonl`, `claude/x.jsonl`)."""

    name: str
    mtime: float
    size: int


class SpoolLocked(StartupError):
    """Another batchd already runs on this spool."""


class Spool:
    """The tree under `root`: inbox/ (and inbox/PROVIDER/ for each configured provider
    NAME in `providers`), processing/, done/, failed/."""

    def __init__(self, root: Path, providers: Iterable[str] = ()) -> None:
        self.root = root
        self.providers = frozenset(providers)
        self.inbox = root / "inbox"
        self.processing = root / "processing"
        self.done = root / "done"
        self.failed = root / "failed"
        self._lock_fd: int | None = None

    def ensure(self) -> None:
        """Create the directories (idempotent)."""
        for d in (self.inbox, self.processing, self.done, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        for name in self.providers:
            (self.inbox / name).mkdir(exist_ok=True)

    def lock(self) -> None:
        """Take an exclusive lock so two daemons never share a spool."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"{self.root}: another batchd is running on this spool") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the spool lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def path(self, rel: str) -> Path:
        """Absolute path of a spool-relative path."""
        return self.root / rel

    def scan(self) -> tuple[list[Entry], dict[str, str]]:
        """Candidates in inbox/ (oldest first) and the entries that will never be taken,
        with why."""
        ready: list[Entry] = []
        ignored: dict[str, str] = {}
        self._scan_dir(self.inbox, "", ready, ignored)
        ready.sort(key=lambda en: (en.mtime, en.name))
        return ready, ignored

    def _scan_dir(self, d: Path, prefix: str, ready: list[Entry], ignored: dict[str, str]) -> None:
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            for e in it:
                rel = prefix + e.name
                if is_candidate(e.name):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    ready.append(Entry(rel, st.st_mtime, st.st_size))
                    continue
                is_dir = e.is_dir(follow_symlinks=False)
                if is_dir and not prefix and e.name in self.providers:
                    self._scan_dir(Path(e.path), e.name + "/", ready, ignored)
                elif (why := ignored_why(rel, is_dir)) is not None:
                    ignored[rel] = why

    def waiting(self) -> list[str]:
        """Names in inbox/ that intake would take, oldest first."""
        return [e.name for e in self.scan()[0]]

    def claim(self, filename: str, sync: bool = True) -> Claimed | None:
        """Rename inbox/FILE to processing/JOB--NAME.jsonl (.jsonl.gz, .jsonl.zst); None if
        it vanished meanwhile. inbox/PROVIDER/FILE (FILE given as `PROVIDER/FILE`) goes
        to processing/JOB~PROVIDER--NAME.jsonl: the job is that provider's.

        The rename moves whatever the entry is (a symlink is moved, never followed);
        validation later rejects anything that is not a regular file. With
        sync=False the caller makes it durable with `sync_claims()` (one pair of
        fsyncs for a whole burst) before recording the job.
        """
        provider, _, base = filename.rpartition("/")
        suffix = input_suffix(base)
        if suffix is None:
            raise ValueError(f"{filename}: not an input file name")
        if provider and provider not in self.providers:
            raise ValueError(f"{filename}: {provider!r} is not a configured provider")
        job_id = str(ULID())
        name = base[: -len(suffix)]
        tag = f"{_PROVIDER}{provider}" if provider else ""
        rel = f"processing/{job_id}{tag}{_SEP}{name}{INPUT_SUFFIXES[suffix.lower()]}"
        try:
            os.rename(self.inbox / filename, self.root / rel)
        except FileNotFoundError:
            return None
        if sync:
            self.sync_claims()
        return Claimed(job_id, name, rel, provider or None)

    def claim_as(self, src: Path, name: str, provider: str | None = None) -> Claimed:
        """Move a finished file of the spool (an HTTP upload) straight into processing/ as
        a new job's input (`provider`'s, as from inbox/PROVIDER/). Replicas share inbox/:
        a file placed there could be claimed by another replica's intake before this one
        answers with its job id."""
        if provider and provider not in self.providers:
            raise ValueError(f"{provider!r} is not a configured provider")
        job_id = str(ULID())
        tag = f"{_PROVIDER}{provider}" if provider else ""
        rel = f"processing/{job_id}{tag}{_SEP}{name}{SUFFIX}"
        os.rename(src, self.root / rel)
        self.sync_claims()
        return Claimed(job_id, name, rel, provider or None)

    def sync_claims(self) -> None:
        """fsync processing/ and inbox/ (and inbox/PROVIDER/): every claim rename so far is
        durable."""
        fsync_dir(self.processing)
        fsync_dir(self.inbox)
        for name in self.providers:
            d = self.inbox / name
            if d.is_dir():
                fsync_dir(d)

    def claimed_files(self) -> Iterator[Claimed]:
        """Every claimed input in processing/ (`JOB--NAME.jsonl`, `.jsonl.gz`, `.jsonl.zst`);
        those whose job id has no record are orphans of a crash."""
        with os.scandir(self.processing) as it:
            names = [e.name for e in it]
        for name in names:
            head, sep, rest = name.partition(_SEP)
            if not sep or name.startswith("."):
                continue
            job_id, provider = _job_part(head)
            suffix = next((s for s in (*COMPRESSED, SUFFIX) if rest.endswith(s)), None)
            if suffix is not None:
                yield Claimed(job_id, rest[: -len(suffix)], f"processing/{name}", provider)

    def partial_files(self) -> Iterator[tuple[str, Path]]:
        """(job id, path) of half-written `JOB--….part` files in processing/ (a `batchd
        retry` or a decompression cut off); those of unrecorded jobs can go."""
        with os.scandir(self.processing) as it:
            found = [(e.name, e.path) for e in it]
        for name, path in found:
            head, sep, _ = name.partition(_SEP)
            if sep and name.endswith(".part"):
                yield _job_part(head)[0], Path(path)

    def dir_taken(self, name: str) -> bool:
        """True when done/NAME or failed/NAME exists (a job must not be given NAME)."""
        return os.path.lexists(self.done / name) or os.path.lexists(self.failed / name)

    def allow_marker(self, sha256: str) -> Path:
        """A file whose presence lets one job with this content through the duplicate check
        (`batchd submit --allow-duplicate`)."""
        return self.root / ".allow-duplicate" / sha256

    def staging(self, job_id: str) -> Path:
        """The directory where a job's results are assembled before publishing."""
        d = self.processing / f"{job_id}.d"
        d.mkdir(exist_ok=True)
        return d

    def adopt_input(self, input_rel: str, staging: Path) -> None:
        """Move the job's input into its staging dir as input.jsonl (idempotent)."""
        src, dst = self.root / input_rel, staging / "input.jsonl"
        if os.path.lexists(src) and not os.path.lexists(dst):
            os.rename(src, dst)
            fsync_dir(staging)
            fsync_dir(src.parent)

    def choose_result_dir(self, kind: str, name: str, taken: set[str]) -> str:
        """First free `kind/NAME`, `kind/NAME-2`, … (never overwrite)."""
        base = self.done if kind == "done" else self.failed
        n = 1
        while True:
            candidate = name if n == 1 else f"{name}-{n}"
            rel = f"{base.name}/{candidate}"
            if rel not in taken and not os.path.lexists(base / candidate):
                return rel
            n += 1

    def publish(self, job_id: str, result_rel: str) -> bool:
        """Rename the staging dir to its result dir; False if already published."""
        src = self.processing / f"{job_id}.d"
        dst = self.root / result_rel
        if not src.exists():
            return dst.exists()
        if os.path.lexists(dst):
            raise FileExistsError(f"{dst} exists; refusing to overwrite")
        os.rename(src, dst)
        fsync_dir(dst.parent)
        fsync_dir(self.processing)
        return True


def enter_inbox(inbox: Path, part: Path, name: str) -> str:
    """Move a finished file (written and fsynced elsewhere on the same filesystem) to
    inbox/NAME.jsonl, or NAME-2.jsonl, … when taken; returns the name it got.

    A hard link never replaces an existing name, so concurrent writers (the HTTP
    queue, `batchd submit` from other users) cannot clobber each other.
    """
    n = 1
    while True:
        fname = f"{name if n == 1 else f'{name}-{n}'}{SUFFIX}"
        try:
            os.link(part, inbox / fname)
        except FileExistsError:
            n += 1
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            # No hard links on this filesystem: check, then rename (racy only between
            # two writers choosing the same name in the same instant).
            if os.path.lexists(inbox / fname):
                n += 1
                continue
            os.rename(part, inbox / fname)
            fsync_dir(inbox)
            return fname
        part.unlink()
        fsync_dir(inbox)
        return fname

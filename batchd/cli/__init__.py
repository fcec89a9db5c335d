"""Command line: the parser and one way from a command to an exit code.

Each command is an async function in commands.py run by one `asyncio.run` (the
read-only ones on a SQLite store without an event loop, see `_run`); every
problem the user must fix ends in one line on stderr and a documented exit code:
0 success; 1 a checked thing failed (an invalid file, a failed check, a job that
failed or cannot be cancelled or retried); 2 usage or configuration error (the
message names the key); 3 no job or more than one job matches JOB.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from batchd import __version__
from batchd.states import JobState

# Only what parsing needs is imported up here: `--version` and `--help` never load the
# commands, and the commands import what they need themselves (see main).

# The commands that only read the store (reads.py; the others are in commands.py): on a
# SQLite file their reads never wait, so they run without an event loop (importing
# asyncio costs more than they do).
READ_ONLY = frozenset({"jobs", "show"})

_EPILOG = """\
examples:
  batchd run -c /etc/batchd/config.toml          run the daemon in the foreground
  batchd submit requests.jsonl --name nightly    copy a file into the inbox, checked
  batchd jobs --state tracking --since 1d        what is running since yesterday
  batchd show nightly                            one job: batches, progress, why it failed
  batchd retry nightly                           resubmit the requests that did not succeed
  batchd cost --since 30d --by day               what the results billed, per day

exit codes: 0 ok; 1 something checked failed; 2 usage or configuration error;
3 no job (or more than one) matches JOB. The config file is --config FILE or
$BATCHD_CONFIG; see config.example.toml for every key.
"""


# The emulator's APIs (batchd.emulator.providers.PROVIDERS; kept here so that parsing
# arguments does not import the emulator).
PROVIDER_NAMES = ("openai", "azure", "groq", "together", "anthropic", "gemini", "mistral")


def _probability(v: str) -> float:
    p = float(v)
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"{v} is not a probability in [0, 1]")
    return p


def _token_limit(v: str) -> tuple[str, int]:
    model, _, n = v.rpartition("=")
    if not model or not n.isdigit():
        raise argparse.ArgumentTypeError(f"{v!r} is not MODEL=N")
    return model, int(n)


def _emulator_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "emulator",
        help="serve the built-in Batch API emulator (for demos, dry runs and tests)",
        description="Serve the OpenAI Batch API on loopback: files, uploads, batches with "
        "the API's checks and statuses. No key is needed (any bearer token is accepted "
        "unless --api-key is given). --port 0 picks a free port and prints it.",
    )
    e.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    e.add_argument("--port", type=int, default=8787, help="port (8787; 0 = any free port)")
    e.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply simulated durations (0.01 = batches finish 100x faster)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the simulated run")
    e.add_argument("--api-key", help="accept only this bearer token (default: any)")
    for flag, what in (
        ("rate-limit", "429 with Retry-After"),
        ("server-error", "500/502/503"),
        ("drop", "a connection closed without response"),
        ("slow", "a response delayed by --fault-slow-seconds"),
        ("ghost-create", "POST /v1/batches creating but losing the response"),
        ("truncate", "a file download cut short"),
    ):
        e.add_argument(
            f"--fault-{flag}",
            type=_probability,
            default=0.0,
            metavar="P",
            help=f"probability of {what} per request",
        )
    e.add_argument("--fault-slow-seconds", type=float, default=0.5, metavar="S")
    e.add_argument("--fault-seed", type=int, default=0, metavar="N", help="fault RNG seed")
    e.add_argument(
        "--fault-force-first",
        action="store_true",
        help="make every enabled fault fire on the first request it can (then at random)",
    )
    e.add_argument(
        "--bandwidth-bytes-per-s", type=float, metavar="B", help="throttle file transfers"
    )
    e.add_argument("--output-pad-bytes", type=int, default=0, metavar="N", help="pad results")
    e.add_argument("--expire-after-seconds", type=float, metavar="S", help="expire batches")
    e.add_argument(
        "--token-limit",
        type=_token_limit,
        action="append",
        default=[],
        metavar="MODEL=N",
        help="enqueued-token limit per model (repeatable)",
    )
    e.add_argument(
        "--request-limit",
        type=_token_limit,
        action="append",
        default=[],
        metavar="MODEL=N",
        help="enqueued-request limit per model (repeatable)",
    )
    e.add_argument(
        "--provider",
        action="append",
        choices=PROVIDER_NAMES,
        metavar="NAME",
        help=f"serve only this API (repeatable; default: all of {', '.join(PROVIDER_NAMES)})",
    )
    e.add_argument(
        "--azure-deployment",
        action="append",
        metavar="NAME",
        help="an Azure batch deployment name (repeatable; default: any name is one)",
    )
    e.add_argument("--webhook-url", help="POST Standard Webhooks batch.* events here")
    e.add_argument("--webhook-secret", metavar="whsec_...", help="sign webhooks with this")
    e.set_defaults(func="emulator")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    p = argparse.ArgumentParser(
        prog="batchd",
        description="batchd makes the OpenAI Batch API boring to operate: drop JSONL files "
        "into a folder (or POST them); batchd validates, splits, uploads, creates and "
        "tracks the batches, and writes every result next to your file.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"batchd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=description or help)
        sp.add_argument(
            "--config", "-c", metavar="FILE", help="TOML config file (default: $BATCHD_CONFIG)"
        )
        return sp

    r = cmd(
        "run",
        "run the daemon in the foreground",
        "Run the daemon: claim files from inbox/, submit, track and collect their batches. "
        "SIGTERM stops it cleanly; SIGHUP re-reads the config and the API key.",
    )
    r.add_argument(
        "--once",
        action="store_true",
        help="process the inbox and every unfinished job, then exit (1 if a job failed)",
    )
    r.set_defaults(func="run")

    sm = cmd(
        "submit",
        "check files, then copy them into the inbox atomically",
        "Check each FILE with the daemon's rules, then copy it into inbox/ (temp name, fsync, "
        "rename; NAME-2, … when NAME is taken). Nothing is copied for a file that fails.",
    )
    sm.add_argument("files", nargs="+", metavar="FILE")
    sm.add_argument("--name", help="job NAME (one FILE only; default: the file name)")
    sm.add_argument(
        "--no-validate", action="store_true", help="skip the local check (the daemon checks)"
    )
    sm.add_argument(
        "--provider",
        metavar="NAME",
        help="send to this configured provider (inbox/NAME/; default: [api])",
    )
    sm.add_argument(
        "--allow-duplicate",
        action="store_true",
        help="submit even if the same content was submitted within [intake] duplicate_window",
    )
    sm.set_defaults(func="submit")

    ck = cmd(
        "check",
        "check config, spool, database, API key and API; one line each",
        "Check that the config is valid, the spool and database are usable, the API key is "
        "found and accepted. Creates nothing. Exit 1 when a check fails.",
    )
    ck.set_defaults(func="check")

    v = cmd(
        "validate",
        "check JSONL files with the daemon's rules (no daemon, no API)",
        "Check FILEs as the daemon would: prints FILE:LINE: CODE: message per problem, and "
        "how many batches a valid file becomes (files over the per-batch limits are split).",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument(
        "--provider",
        metavar="P",
        help="check with this provider's rules and limits: a configured NAME, or a kind "
        "(openai, azure_openai, anthropic, gemini, mistral, groq, together); default: [api]",
    )
    v.set_defaults(func="validate")

    j = cmd("jobs", "list jobs, newest first", "List jobs, newest first.")
    j.add_argument("--json", action="store_true", help="JSON instead of a table")
    j.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in JobState],
        help="only jobs in this state (repeatable)",
    )
    j.add_argument("--since", help="only jobs claimed since: 90s, 30m, 2h, 7d, or ISO-8601 (UTC)")
    j.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    j.add_argument(
        "--cost", action="store_true", help="add each job's estimate (low-high) and actual cost"
    )
    j.set_defaults(func="jobs")

    s = cmd(
        "show",
        "show one job: progress, batches, why it failed, history",
        "Show one job. JOB is its id, a unique id prefix, or a NAME (the newest job "
        "dropped under that NAME, or the one that got it, e.g. nightly-2).",
    )
    s.add_argument("job", metavar="JOB", help="job id, unique id prefix, or NAME")
    s.add_argument("--json", action="store_true", help="JSON instead of text")
    s.set_defaults(func="show")

    c = cmd(
        "cancel",
        "cancel a job and collect its partial results",
        "Cancel a job's batches, wait for them to end, and publish the partial results in "
        "done/NAME/. With a daemon running the daemon does the work; otherwise this command "
        "does it for this job only.",
    )
    c.add_argument("job", metavar="JOB", help="job id, unique id prefix, or NAME")
    c.add_argument("--wait", type=float, default=900.0, help="seconds to wait (default 900)")
    c.set_defaults(func="cancel")

    rt = cmd(
        "retry",
        "resubmit an ended job's failed and missing requests as a new job",
        "Queue the requests of an ended job (done, failed or cancelled) that have no "
        "successful result as a new job NAME-retry. A job is retried once: a second retry "
        "says which job already retries it.",
    )
    rt.add_argument("job", metavar="JOB", help="job id, unique id prefix, or NAME")
    rt.set_defaults(func="retry")

    co = cmd(
        "cost",
        "what results billed: by model, source or day",
        "Report the actual cost of the results collected since --since (batch prices), "
        "grouped by model, source (inbox, http, retry) or day ([budget] timezone).",
    )
    co.add_argument(
        "--since", default="30d", help="results collected since: 30d (default), 2h, ISO-8601"
    )
    co.add_argument("--by", choices=("model", "source", "day"), default="model")
    co.add_argument("--json", action="store_true", help="JSON instead of a table")
    co.set_defaults(func="cost")

    _emulator_parser(sub)

    d = sub.add_parser(
        "demo",
        help="show a file flowing inbox -> done against the emulator (no API key)",
        description="Start the emulator and the daemon on a temporary spool, drop a file, "
        "and show it flowing to done/.",
    )
    d.add_argument("--dir", help="spool/work directory to use (default: a new temp dir)")
    d.set_defaults(func="demo")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `batchd` command."""
    args = build_parser().parse_args(argv)
    from batchd.cli.common import EXIT_USAGE, Fail
    from batchd.config import ConfigError
    from batchd.errors import StartupError

    try:
        return _run(args)
    except ConfigError as e:
        print(f"batchd: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as e:
        print(f"batchd: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Fail as e:
        print(f"batchd: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:
        # `batchd jobs | head`: the reader went away; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    """Run the command `args.func` names: without an event loop when it only reads a
    SQLite store, else in `asyncio.run`."""
    from batchd.cli.common import config, finish

    if args.func in READ_ONLY:
        from batchd.cli import reads

        func = getattr(reads, args.func)
        if config(args).state.url is None:
            return int(finish(func(args)))
    else:
        from batchd.cli import commands

        func = getattr(commands, args.func)
    import asyncio

    return int(asyncio.run(func(args)))

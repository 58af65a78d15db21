"""``weightcache-agent``: run (the daemon), prefetch, verify, gc, ls, label-for.

Exit codes: 0 success; 1 a model or check failed (the message says which and why); 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NoReturn

from agent.config import AgentSettings, add_arguments, load_settings
from agent.errors import ConfigError, WeightcacheError
from agent.store.cache import Cache
from common.units import format_size

log = logging.getLogger("agent")

_S3_FLAGS = {"cache_dir", "concurrency", "min_part_size", "connect_timeout", "read_timeout", "max_attempts",
             "retry_base_delay", "retry_max_delay", "s3_addressing_style", "max_bytes", "min_free_bytes",
             "log_format", "log_level", "orphan_max_age_seconds", "old_revision_grace_seconds", "fsync"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightcache-agent",
        description="Node-local S3 model-weight cache for Kubernetes GPU nodes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the DaemonSet daemon: watch pods on NODE_NAME (or --pods-file) and fetch")
    add_arguments(run)

    pre = sub.add_parser("prefetch", help="make models ready now; print each model's path")
    pre.add_argument("uris", nargs="+", metavar="URI", help="s3://BUCKET/PREFIX/ or s3://BUCKET/KEY")
    add_arguments(pre, only=_S3_FLAGS)

    ver = sub.add_parser("verify", help="re-hash every cached file; repair what is bad by fetching it again")
    ver.add_argument("uris", nargs="*", metavar="URI", help="only these models (default: all)")
    ver.add_argument("--no-repair", action="store_true", help="only report")
    add_arguments(ver, only=_S3_FLAGS)

    gc = sub.add_parser("gc", help="evict least-recently-used models down to the budget; drop old revisions")
    add_arguments(gc, only=_S3_FLAGS)

    ls = sub.add_parser("ls", help="list cached models with sizes and last use")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add_arguments(ls, only={"cache_dir"})

    lab = sub.add_parser("label-for", help="print the node label that marks URI ready on a node")
    lab.add_argument("uri", metavar="URI")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "label-for":
        from agent.uris import label_key_for, parse_model_uri

        try:
            print(f"{label_key_for(parse_model_uri(args.uri).uri)}=ready")
        except WeightcacheError as e:
            print(f"weightcache-agent: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        settings = load_settings(args)
    except ConfigError as e:
        print(f"weightcache-agent: {e}", file=sys.stderr)
        return 2
    from agent.logs import setup_logging
    from agent.memory import tune_malloc

    setup_logging(fmt=settings.log_format, level=settings.log_level)
    tune_malloc()
    try:
        if args.command == "run":
            from agent.daemon.run import run_daemon

            return asyncio.run(run_daemon(settings))
        if args.command == "prefetch":
            return asyncio.run(_prefetch(settings, args.uris))
        if args.command == "verify":
            return asyncio.run(_verify(settings, set(args.uris), repair=not args.no_repair))
        if args.command == "gc":
            return _gc(settings)
        if args.command == "ls":
            return _ls(settings, as_json=args.json)
    except KeyboardInterrupt:
        return 130
    except WeightcacheError as e:
        print(f"weightcache-agent: {e}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


async def _prefetch(settings: AgentSettings, uris: list[str]) -> int:
    from agent.transfer.fetch import Fetcher
    from agent.transfer.progress import Progress
    from agent.transfer.s3 import S3Client
    from agent.uris import parse_model_uri

    models = []
    bad = 0
    for u in uris:
        try:
            models.append(parse_model_uri(u))
        except WeightcacheError as e:
            print(f"weightcache-agent: {e}", file=sys.stderr)
            bad += 1
    if bad:
        return 2
    cache = Cache(settings.cache_dir, fsync=settings.fsync)
    cache.recover(orphan_max_age_seconds=settings.orphan_max_age_seconds)
    progress = Progress()
    failures = 0
    async with S3Client(settings) as s3:
        # Ready when verified: no flush on the way out. The node's agent (or `gc`) flushes it later; until then it
        # is trusted for this boot only, and re-verified after a reboot.
        fetcher = Fetcher(settings, cache, s3, flush_in_background=False)
        results = await asyncio.gather(*(fetcher.ensure(m, progress=progress) for m in models),
                                       return_exceptions=True)
    progress.finish()
    for m, r in zip(models, results):
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            failures += 1
            reason = getattr(r, "reason", type(r).__name__)
            print(f"weightcache-agent: {m}: failed ({reason}): {r}", file=sys.stderr)
            continue
        how = "cached" if r.hit else f"fetched {format_size(r.downloaded_bytes)} in {r.seconds:.2f}s"
        log.info("%s ready at %s (%s, %s)", m, r.path, format_size(r.total_bytes), how)
        print(r.path)
    return 1 if failures else 0


async def _verify(settings: AgentSettings, uris: set[str], *, repair: bool) -> int:
    from agent.transfer.fetch import Fetcher
    from agent.transfer.s3 import S3Client
    from agent.transfer.verify import verify

    cache = Cache(settings.cache_dir, fsync=settings.fsync)
    cache.recover(orphan_max_age_seconds=settings.orphan_max_age_seconds)
    if repair:
        async with S3Client(settings) as s3:
            problems = await verify(cache, Fetcher(settings, cache, s3), uris=uris or None)
    else:
        problems = await verify(cache, None, uris=uris or None)
    checked = [m for m in cache.list_manifests() if not uris or m.uri in uris]
    for p in problems:
        print(f"{'REPAIRED' if p.repaired else 'BAD'}\t{p.uri}\t{p.path}\t{p.detail}")
    print(f"verified {len(checked)} models: {len(problems)} bad files, "
          f"{sum(p.repaired for p in problems)} repaired", file=sys.stderr)
    return 1 if any(not p.repaired for p in problems) else 0


def _gc(settings: AgentSettings) -> int:
    from agent.store.eviction import make_room
    from agent.store.maintenance import flush_pending

    cache = Cache(settings.cache_dir, fsync=settings.fsync)
    cache.recover(orphan_max_age_seconds=settings.orphan_max_age_seconds)
    before = cache.used_bytes()
    make_room(cache, need_bytes=0, settings=settings, pinned=set(), for_uri="gc")
    cache.sweep_orphan_blobs()
    if settings.fsync:
        flush_pending(cache)
    after = cache.used_bytes()
    print(f"cache uses {format_size(after)} (freed {format_size(before - after)})")
    return 0


def _ls(settings: AgentSettings, *, as_json: bool) -> int:
    cache = Cache(settings.cache_dir, fsync=settings.fsync)
    if not cache.root.exists():
        print(f"weightcache-agent: no cache at {cache.root}", file=sys.stderr)
        return 1
    pins = cache.read_pins()
    rows = []
    for m in sorted(cache.list_manifests(), key=lambda m: m.last_used, reverse=True):
        ready = cache.lookup(m.model_uri) is not None
        rows.append({"uri": m.uri, "state": "ready" if ready else "stale", "bytes": m.total_bytes,
                     "files": len(m.files), "revision": m.revision, "path": str(cache.root / m.path),
                     "last_used": m.last_used, "fetched_at": m.fetched_at, "pinned": m.model_id in pins})
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'SIZE':>11}  {'FILES':>5}  {'LAST USED':<20}  {'STATE':<6}  URI")
    for r in rows:
        last = _age(str(r["last_used"]))
        print(f"{format_size(int(r['bytes'])):>11}  {r['files']:>5}  {last:<20}  {r['state']:<6}  {r['uri']}"
              + ("  (pinned)" if r["pinned"] else ""))
    print(f"total {format_size(cache.used_bytes())} in {cache.root}", file=sys.stderr)
    return 0


def _age(iso: str) -> str:
    try:
        delta = datetime.now(UTC) - datetime.fromisoformat(iso)
    except ValueError:
        return iso
    s = int(delta.total_seconds())
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def cli() -> NoReturn:
    """The console script (and ``python -m agent``): :func:`main`, then out without tearing the interpreter down.

    By then every file is closed and every task awaited; the module and thread clean-up of a normal exit only
    added tens of ms to each ``prefetch`` (an initContainer's whole job) after its work was done.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()

"""``modelpress``: one console script for every role.

- ``serve``                  the embedded default (API + one worker, SQLite, no servers)
- ``admin create-key``       a tenant's API key, straight in the configured database
- ``admin set-quota``        a tenant's own concurrent-jobs / stored-bytes quotas
- ``compress``               the offline engine, no server (``app.engine.cli``)
- ``upload-model`` ``upload-data`` ``submit`` ``status`` ``list`` ``cancel`` ``download``
  ``report``                 the HTTP client (``app.client.cli``)

Server-side and engine modules are imported only by the command that needs them, so the
client commands start fast and work without torch being loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from app.client import cli as client_cli

# Loggers of libraries that report harmless facts at import on a CPU-only machine: torchao
# ("Failed to load ..._C_mxfp8...so", its CUDA kernels) and torch's pytree deprecation notes.
QUIET_AT_IMPORT = ("torchao", "torch.utils._pytree")


def _quiet_library_imports() -> None:
    for name in QUIET_AT_IMPORT:
        logging.getLogger(name).setLevel(logging.ERROR)


def _compress(argv: list[str]) -> int:
    _quiet_library_imports()
    try:
        from app.engine.cli import add_compress_parser, compress
    except ImportError as e:
        print(f"error: the offline compressor is not available ({e})", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog="modelpress")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compress_parser(sub)
    args = parser.parse_args(["compress", *argv])
    return int(compress(args))


def _create_key(tenant: str) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from app.config import get_settings
    from app.db.migrate import upgrade
    from app.db.session import session_scope
    from app.services.admin import create_key

    settings = get_settings()
    if (missing := _missing_sqlite_file(settings.database_url)) is not None:
        # Creating it would print a key for a new, empty database no server reads (401).
        print(f"error: no database at {missing} (MODELPRESS_DATABASE_URL="
              f"{settings.database_url}, resolved against the current directory "
              f"{Path.cwd()}).\n  Run this in the directory where `modelpress serve` runs, "
              "or set MODELPRESS_DATABASE_URL to the server's database.", file=sys.stderr)
        return 1
    try:
        if settings.is_sqlite:
            upgrade(settings.database_url)  # the embedded default has no separate migrate step
        with session_scope(settings) as session:
            key = create_key(session, tenant)
    except SQLAlchemyError as e:
        print(f"error: database {settings.database_url.split('@')[-1]}: "
              f"{str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(key)
    print(f"  key for tenant {tenant!r}; shown once, only its hash is stored", file=sys.stderr)
    return 0


def _missing_sqlite_file(url: str) -> Path | None:
    """The absolute path of a SQLite database file that does not exist, else None."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database).resolve()
    return None if path.exists() else path


def _quota(text: str) -> int | None:
    """A quota argument: a non-negative integer, 0 = unlimited, ``default`` = the setting."""
    if text == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("an integer >= 0, or 'default'") from None
    if value < 0:
        raise argparse.ArgumentTypeError("an integer >= 0, or 'default'")
    return value


def _set_quota(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from app.config import get_settings
    from app.db.session import session_scope
    from app.services.admin import set_quotas

    settings = get_settings()
    # Only the options given (argparse.SUPPRESS leaves the others out of args).
    changes = {k: v for k, v in vars(args).items()
               if k in ("max_concurrent_jobs", "max_stored_bytes")}
    try:
        with session_scope(settings) as session:
            jobs, stored = set_quotas(session, args.tenant, **changes)
    except (LookupError, SQLAlchemyError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1

    def show(value: int | None, default: int) -> str:
        value = default if value is None else value
        return "unlimited" if value == 0 else str(value)

    print(f"tenant {args.tenant!r}: max_concurrent_jobs "
          f"{show(jobs, settings.max_concurrent_jobs)}, max_stored_bytes "
          f"{show(stored, settings.max_stored_bytes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelpress",
        description="ModelPress: compress trained neural networks to a stated budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the API and one worker (embedded default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=1, help="worker processes")
    p.add_argument("--beat", action="store_true",
                   help="also run Celery beat (only with MODELPRESS_REAPER_IN_WORKER=false)")

    p = sub.add_parser("admin", help="administration")
    admin = p.add_subparsers(dest="admin_command", required=True, metavar="ADMIN_COMMAND")
    k = admin.add_parser("create-key", help="create an API key (and the tenant if new)")
    k.add_argument("--tenant", required=True, help="tenant name")
    q = admin.add_parser("set-quota", help="set a tenant's own quotas (others keep theirs)")
    q.add_argument("--tenant", required=True, help="tenant name")
    for flag, what in (("--max-concurrent-jobs", "queued + running jobs"),
                       ("--max-stored-bytes", "bytes of uploaded models and data sets")):
        q.add_argument(flag, type=_quota, default=argparse.SUPPRESS,
                       help=f"{what}; 0 = unlimited, 'default' = the server setting")

    # Listed for --help only: main() hands "compress ..." to app.engine.cli before parsing.
    sub.add_parser("compress", add_help=False,
                   help="compress a model offline, no server (see: modelpress compress -h)")
    client_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compress":
        return _compress(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from app.serve import serve

        return serve(args.host, args.port, args.concurrency, beat=args.beat)
    if args.command == "admin" and args.admin_command == "set-quota":
        return _set_quota(args)
    if args.command == "admin":
        return _create_key(args.tenant)
    return client_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())

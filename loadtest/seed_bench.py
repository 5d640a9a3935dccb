"""How fast a synthetic city is seeded (server/seed.py), and in how much memory.

    python -m loadtest.seed_bench --citizens 1000000 --store sqlite
    python -m loadtest.seed_bench --citizens 1000000 --store postgresql://user@host/db

Prints one JSON line: citizens, records, seed_s, store_bytes, peak_rss_bytes (this process's
high-water mark, VmHWM: the generator, the encoding and, for SQLite, the database's page cache;
PostgreSQL's own memory is the server's), records_per_s. ``sqlite``: a new file in a temporary
directory under ``--dir`` (default /tmp), deleted afterwards (``--keep`` keeps it).
A PostgreSQL URL names a server: the city goes into a new database made there (the role
needs CREATEDB), dropped afterwards unless ``--keep``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from kernel.spec import load_spec
from server.keys import Keys
from server.seed import seed_store
from server.store import open_store


#: The SQLite file's size per seeded person (measured: 33.2 GB for 12.5 M people), with
#: room for the sorts of the index builds.
SQLITE_BYTES_PER_CITIZEN = 2_900


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sqlite_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.seed_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--citizens", type=int, required=True)
    ap.add_argument("--store", default="sqlite", help="sqlite, or a postgresql:// URL of a server")
    ap.add_argument("--seed", type=int, default=2018)
    ap.add_argument("--dir", default="/tmp", help="where the SQLite file goes (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the store (prints where)")
    ap.add_argument("--progress", action="store_true", help="a progress bar on stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    keys = Keys(card=secrets.token_bytes(32), audit=secrets.token_bytes(32))
    spec = load_spec()

    # SIGTERM ends the run through the cleanup below (the store is deleted).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    admin_dsn = database = directory = None
    if args.store == "sqlite":
        need = int(args.citizens * SQLITE_BYTES_PER_CITIZEN)
        free = shutil.disk_usage(args.dir).free
        if free < need:
            print(f"error: about {need / 1e9:.0f} GB needed in {args.dir} for {args.citizens:,} people, "
                  f"{free / 1e9:.0f} GB free", file=sys.stderr)
            return 1
        directory = Path(tempfile.mkdtemp(prefix="qj-seed-bench-", dir=args.dir))
        url = f"sqlite:///{directory}/qianjiang.db"
    elif args.store.startswith(("postgresql://", "postgres://")):
        import psycopg
        from psycopg import sql

        admin_dsn, database = args.store, f"qj_seed_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        url = urlsplit(admin_dsn)._replace(path=f"/{database}").geturl()
    else:
        ap.error("--store: sqlite or a postgresql:// URL")
    try:
        store = open_store(url)
        try:
            t0 = time.perf_counter()
            seeded = seed_store(store, spec, args.citizens, args.seed, keys, progress=args.progress)
            seed_s = time.perf_counter() - t0
        finally:
            store.close()
        if directory is not None:
            store_bytes = _sqlite_bytes(directory)
        else:
            import psycopg

            with psycopg.connect(url, autocommit=True) as db:
                store_bytes = db.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        print(json.dumps({
            "citizens": seeded.citizens, "records": seeded.records, "seed_s": round(seed_s, 1),
            "store_bytes": store_bytes, "peak_rss_bytes": peak_rss_bytes(),
            "records_per_s": round(seeded.records / seed_s) if seed_s else None,
            "store": "sqlite" if directory is not None else "postgresql",
        }), flush=True)
    finally:
        if args.keep:
            print(f"kept: {url}", file=sys.stderr)
        elif directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        elif database is not None:
            import psycopg
            from psycopg import sql

            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dk serve``: start the API and its workers; ``dk serve token create|list|revoke``."""

from __future__ import annotations

import os
import subprocess
import sys

from ..errors import DKError


def add_serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="run the job service: HTTP API, workers and dashboard",
        description="Settings come from DK_SERVE_* variables or --config FILE (TOML); "
        "the options below override both.",
    )
    s.add_argument("--config", help="settings file (TOML), e.g. data_dir, data_roots, workers")
    s.add_argument("--data-dir", help="where the database, jobs and uploads live")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--workers", type=int, help="worker processes (0: accept jobs, run none)")
    ss = s.add_subparsers(dest="serve_cmd", metavar="token")
    t = ss.add_parser("token", help="manage API tokens")
    ts = t.add_subparsers(dest="token_cmd", required=True, metavar="create|list|revoke")
    c = ts.add_parser("create", help="create a token and print it (once)")
    c.add_argument("name")
    ts.add_parser("list", help="list token names")
    r = ts.add_parser("revoke", help="revoke a token (its jobs stay)")
    r.add_argument("name")


def serve_main(args) -> int:
    try:
        import fastapi  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise DKError("the service needs its extra: pip install 'darkknowledge[service]'") from None
    from .settings import load_settings

    settings = load_settings(
        args.config, data_dir=args.data_dir, host=args.host, port=args.port, workers=args.workers
    )
    if args.serve_cmd == "token":
        return _token(settings, args)
    return _serve(settings)


def _token(settings, args) -> int:
    from sqlalchemy import select

    from .auth import create_token, revoke_token
    from .db import Token, init_db, make_engine, session_factory

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    init_db(engine)
    with session_factory(engine)() as db:
        if args.token_cmd == "create":
            token = create_token(db, args.name)
            print(token)
            print(f"token {args.name!r} created; it is shown only this once", file=sys.stderr)
        elif args.token_cmd == "list":
            for t in db.scalars(select(Token).order_by(Token.id)):
                state = " (revoked)" if t.token_hash.startswith("revoked:") else ""
                print(f"{t.name}{state}")
        else:
            revoke_token(db, args.name)
            print(f"token {args.name!r} revoked", file=sys.stderr)
    engine.dispose()
    return 0


def _serve(settings) -> int:
    import uvicorn

    from .app import create_app

    app = create_app(settings)  # creates the tables before any worker starts
    env = {**os.environ, **settings.to_env()}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "darkknowledge.service.worker",
                "--name",
                f"{os.uname().nodename}-{os.getpid()}-w{i}",
                "--parent",
                str(os.getpid()),
            ],
            env=env,
        )
        for i in range(settings.workers)
    ]
    print(
        f"dk serve: http://{settings.host}:{settings.port}/ui  data {settings.data_dir}  "
        f"workers {settings.workers}",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        for w in workers:
            w.terminate()  # a running job is requeued and resumes at the next start
        for w in workers:
            try:
                w.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.kill()
    return 0

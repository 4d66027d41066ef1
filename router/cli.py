"""Command line: `modelherd serve ...` and `modelherd pull NAME|SOURCE`.

Kept free of heavy imports: spawned workers import the parent's main module,
and this is it when started from the console script.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelherd", description="Serve several local LLMs "
                                     "behind one OpenAI-compatible endpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="TOML config file (every key optional)")
    serve.add_argument("--host", action="append", metavar="HOST",
                       help="address to listen on (default 127.0.0.1); repeatable")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--models-dir", dest="models_dirs", action="extend", nargs="+", metavar="DIR",
                       help="folder(s) to scan for models; repeatable")
    serve.add_argument("--cache-dir", metavar="DIR",
                       help="where downloaded models are kept (default: systemd's CACHE_DIRECTORY, "
                            "else $XDG_CACHE_HOME/modelherd)")
    serve.add_argument("--no-builtin-models", dest="builtin_models", action="store_false", default=None,
                       help="without a config file, offer only the models found in the models dirs")
    serve.add_argument("--no-autoload", dest="autoload", action="store_false", default=None,
                       help="do not load a model on first use; use POST /models/load")
    serve.add_argument("--api-key", dest="api_keys", action="extend", nargs="+", metavar="KEY",
                       help="require one of these API keys; repeatable")
    serve.add_argument("--max-models", type=int, metavar="N",
                       help="models loading or loaded at once; the least recently used idle one "
                            "is unloaded to make room (default 4; 0 = no limit)")
    serve.add_argument("--idle-ttl", type=float, metavar="SECONDS",
                       help="unload a model idle this long (default 0 = never)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--max-body-bytes", type=int, help="largest request body (default 16 MiB)")
    pull = sub.add_parser("pull", help="download a model into the cache without serving it")
    pull.add_argument("what", metavar="NAME|SOURCE",
                      help="a model of the config (or a built-in one), or hf://... / https://...")
    pull.add_argument("--config", type=Path, help="TOML config file naming the model")
    pull.add_argument("--cache-dir", metavar="DIR", help="where downloads go (as for serve)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "pull":
        from router.pullcli import pull

        return pull(args.what, args.config, args.cache_dir)
    from router.config import ConfigError, build_settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        settings = build_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"modelherd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.server.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from router.catalog import build_catalog
    from router.server import serve

    try:
        catalog = build_catalog(settings)  # alias clashes and option typos are config errors too
    except ConfigError as exc:
        print(f"modelherd: {exc}", file=sys.stderr)
        return 2
    return serve(settings, catalog)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `modelherd serve ...`, `modelherd pull NAME|SOURCE`, the client commands
(`ps`, `ls`, `load`, `unload`, `rm`: router.clientargs, router.clientcli), and
`modelherd service install|uninstall` (router.service).

Kept free of heavy imports: spawned workers import the parent's main module,
and this is it when started from the console script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router.clientargs import CLIENT_COMMANDS, add_client_commands, add_connection_options
from router.version import version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelherd", description="Serve several local LLMs "
                                     "behind one OpenAI-compatible endpoint.")
    parser.add_argument("--version", action="version", version=f"modelherd {version()}")
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
    serve.add_argument("--ui-dir", metavar="DIR",
                       help="serve a built web app (e.g. llama.cpp's web UI) at / from DIR")
    pull = sub.add_parser("pull", help="download a model into the cache without serving it: through the "
                          "daemon when one answers, else here")
    pull.add_argument("what", metavar="NAME|SOURCE",
                      help="a model of the config (or a built-in one), or hf://... / https://...")
    pull.add_argument("--config", type=Path, help="TOML config file naming the model")
    pull.add_argument("--cache-dir", metavar="DIR", help="where downloads go (as for serve); implies --local")
    pull.add_argument("--local", action="store_true",
                      help="download in this process, into this user's cache, without asking a daemon")
    add_connection_options(pull, config=False)
    add_client_commands(sub)
    _add_service_commands(sub)
    return parser


def _add_service_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    service = sub.add_parser("service", help="run the daemon as a systemd service (router.service)",
                             epilog="exit codes: 0 done, 1 a systemctl command failed, 69 no systemd "
                                    "here, 73 a file could not be written, 77 not root")
    actions = service.add_subparsers(dest="action", required=True)
    install = actions.add_parser("install", help="write the unit (and a starter config and key file "
                                 "if there are none), then enable and start it")
    uninstall = actions.add_parser("uninstall", help="stop, disable and remove the unit")
    for p in (install, uninstall):
        p.add_argument("--user", action="store_true",
                       help="a user unit in ~/.config/systemd/user, with systemctl --user")
        p.add_argument("--dry-run", action="store_true", help="print what would be written and run")
        p.add_argument("--root", type=Path, metavar="DIR",
                       help="work in DIR as if it were / (an image or a package): files only, a "
                            "system unit enabled with systemctl --root, nothing started")
    uninstall.add_argument("--purge", action="store_true", help="also remove the config and key file")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "pull":
        from router.clientcli import pull

        return pull(args)
    if args.command == "service":
        from router import service

        if args.action == "install":
            return service.install(args.user, args.dry_run, args.root)
        return service.uninstall(args.user, args.dry_run, args.root, args.purge)
    if args.command in CLIENT_COMMANDS:
        from router.clientcli import run

        return run(args)
    from router.config import ConfigError, build_settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        settings = build_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"modelherd: {exc}", file=sys.stderr)
        return 2
    from router.logs import configure

    configure(settings.server.log_level)  # the journal's format under systemd (router.logs)
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

"""The client commands' arguments (`ps`, `ls`, `load`, `unload`, `rm`, and `pull`'s daemon
options), and which daemon they talk to.

Standard library only: router.cli imports this, and every spawned worker imports router.cli.

Which daemon: `--url`, else $MODELHERD_URL, else the [server] host and port of the config
file (`--config`, else /etc/modelherd/config.toml when it is readable), else
http://127.0.0.1:8080. The key: `--api-key`, else $MODELHERD_API_KEY.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

CLIENT_COMMANDS = ("ps", "ls", "load", "unload", "rm")
SYSTEM_CONFIG = Path("/etc/modelherd/config.toml")  # the service's ConfigurationDirectory
DEFAULT_URL = "http://127.0.0.1:8080"

# What a script can rely on.
OK, FAILED, USAGE, UNREACHABLE, REFUSED, INTERRUPTED = 0, 1, 2, 3, 4, 130


class UsageError(Exception):
    """A bad --url or an unreadable config: exit 2."""


@dataclass(frozen=True)
class Target:
    url: str
    key: str | None
    named: bool  # --url or $MODELHERD_URL named it: `pull` never falls back to a local download


def add_connection_options(p: argparse.ArgumentParser, config: bool = True) -> None:
    p.add_argument("--url", help="the daemon (default: $MODELHERD_URL, else the config's host and port, "
                   f"else {DEFAULT_URL})")
    p.add_argument("--api-key", metavar="KEY", help="API key (default: $MODELHERD_API_KEY)")
    if config:
        p.add_argument("--config", type=Path, help=f"the daemon's config file, for its host and port "
                       f"(default: {SYSTEM_CONFIG} when readable)")


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ps = sub.add_parser("ps", help="models loaded or loading: state, memory, slots, idle time")
    ps.add_argument("--json", action="store_true", help="the daemon's JSON for them instead of a table")
    ls = sub.add_parser("ls", help="every model the daemon knows: source, size, cached or not")
    ls.add_argument("--json", action="store_true", help="the daemon's JSON instead of a table")
    for name, what in (("load", "load a model and wait until it is loaded (with progress)"),
                       ("unload", "unload a model and wait until its worker has exited"),
                       ("rm", "delete a downloaded model's files from the daemon's cache")):
        p = sub.add_parser(name, help=what)
        p.add_argument("model", metavar="NAME", help="a model's name or alias")
    for p in (ps, ls, *[sub.choices[n] for n in ("load", "unload", "rm")]):
        add_connection_options(p)


def target(args: argparse.Namespace, env: dict[str, str] | None = None) -> Target:
    env = dict(os.environ) if env is None else env
    key = args.api_key or env.get("MODELHERD_API_KEY") or None
    named = args.url or env.get("MODELHERD_URL")
    if named:
        return Target(_checked(named), key, True)
    config = args.config
    if config is None and os.access(SYSTEM_CONFIG, os.R_OK):
        config = SYSTEM_CONFIG
    return Target(url_from_config(config) if config is not None else DEFAULT_URL, key, False)


def url_from_config(path: Path) -> str:
    """http://HOST:PORT of the config's [server] (its first host; a wildcard means this machine)."""
    try:
        server = tomllib.loads(path.read_text(encoding="utf-8")).get("server", {})
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    host = server.get("host", "127.0.0.1")
    host = host[0] if isinstance(host, list) and host else host
    port = server.get("port", 8080)
    if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
        raise UsageError(f"config file {path}: no usable [server] host and port for the daemon's URL "
                         "(give --url)")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:  # a name
        pass
    return f"http://{host}:{port}"


def _checked(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise UsageError(f"not a daemon URL: {url!r} (expected http://HOST:PORT)")
    return url.rstrip("/")

"""The systemd unit, the starter config and the starter key file, as text.

`render_unit()` is the one source of the unit: `modelherd service install` writes it with
this installation's command, and systemd/modelherd.service in the repository is it
rendered for /opt/modelherd/.venv (a test keeps the two equal). A user unit (`--user`)
leaves out what a per-user service manager cannot do: it has no privileges to switch
users, drop capabilities, filter devices or add groups, and the mount namespaces behind
ProtectSystem= and friends need unprivileged user namespaces, which not every kernel
allows. The seccomp filters (system calls, address families, namespaces, realtime,
personality) work in both.
"""

from __future__ import annotations

import grp
import json
from collections.abc import Sequence

UNIT_NAME = "modelherd.service"
CONFIG_NAME = "config.toml"
KEYS_NAME = "keys.toml"
SHIPPED_COMMAND = ("/opt/modelherd/.venv/bin/modelherd",)  # systemd/modelherd.service's
# Device nodes belong to these groups on most distributions (/dev/dri/renderD*, /dev/kfd).
GPU_GROUPS = ("video", "render")
WATCHDOG_SEC = 30

_HEADER = """\
# modelherd as a {kind} service. `modelherd service install{flag}` writes this file with the
# paths of the installation it runs from; see the README's "Running as a service".
# Config: {config_dir}/{config} (`systemctl{ctl} reload modelherd` applies an edit).
# Logs: `journalctl{ctl} -u modelherd` (`-p warning`: warnings and errors only).
"""

_UNIT = """\
[Unit]
Description=modelherd: several local LLMs behind one OpenAI-compatible endpoint
After=network-online.target
Wants=network-online.target
"""

# Both kinds of unit: how it starts, reloads, stops and is watched.
_SERVICE = """\
[Service]
# READY=1 once the port answers, STATUS= lines, RELOADING=1/READY=1 around a reload,
# STOPPING=1 when the drain starts (router/notify.py).
Type=notify
NotifyAccess=main
ExecStart={exec_start} serve --config %E/modelherd/config.toml
# SIGHUP: read the config and the models dirs again (the same as POST /models/reload).
ExecReload=/bin/kill -HUP $MAINPID
# The event loop itself sends WATCHDOG=1 every WatchdogSec/2: a wedged loop is restarted.
WatchdogSec={watchdog}
Restart=on-failure
RestartSec=2
# SIGTERM only to the router: it drains the requests in flight and stops its own workers
# (shutdown message, grace, SIGTERM, SIGKILL); what is left after the timeout is killed.
KillMode=mixed
# The drain (stop_timeout, 10 s by default) and the worker ladder (3 s + 3 s) fit well.
TimeoutStopSec=45
# %E/modelherd: /etc/modelherd (~/.config/modelherd for a user unit). The daemon reads
# $CACHE_DIRECTORY for downloads and $RUNTIME_DIRECTORY for its worker sockets.
ConfigurationDirectory=modelherd
CacheDirectory=modelherd
RuntimeDirectory=modelherd
RuntimeDirectoryMode=0700
# Memory admission reads this limit (cgroup v2) when it is lower than the free memory.
#MemoryMax=20G
UMask=0077
NoNewPrivileges=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
# AF_UNIX: the worker sockets (ZeroMQ ipc://) and the notify socket.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
"""

_SYSTEM_ONLY = """\
# Models: *.gguf files (or one folder per model) in /var/lib/modelherd/models.
StateDirectory=modelherd
# API keys: the `keys` credential, a key file ([[keys]] tables, router/keys.py) that only
# root can read; the service reads its copy in $CREDENTIALS_DIRECTORY. Read at start: a
# change needs `systemctl restart modelherd`.
LoadCredential=keys:%E/modelherd/keys.toml
DynamicUser=yes
LimitNOFILE=65536
# GPUs: CUDA (/dev/nvidia*, /dev/nvidiactl, /dev/nvidia-uvm*, /dev/nvidia-caps/*), ROCm
# (/dev/kfd) and Vulkan or ROCm render nodes (/dev/dri/*); no other device.
DevicePolicy=closed
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
DeviceAllow=char-drm rw
DeviceAllow=char-kfd rw
{groups}CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateMounts=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
# Not ProcSubset=pid: memory admission reads /proc/meminfo.
ProtectProc=invisible
"""

_INSTALL = """\
[Install]
WantedBy={target}
"""


def quote(arg: str) -> str:
    """One ExecStart= word: `%` and `$` escaped (specifiers, variables), quoted if needed."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c in escaped for c in ' \t"\'\\;'):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def existing_groups(names: Sequence[str] = GPU_GROUPS) -> list[str]:
    """The groups of `names` this system has: a SupplementaryGroups= entry that does not
    exist keeps the service from starting."""
    found = []
    for name in names:
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        found.append(name)
    return found


def render_unit(command: Sequence[str], *, user: bool = False, groups: Sequence[str] = GPU_GROUPS,
                protect_home: str = "yes") -> str:
    """The unit for a daemon started by `command` (its program and leading arguments).
    `protect_home`: "read-only" when the installation lives under /home or /root."""
    kind = "user" if user else "system"
    header = _HEADER.format(kind=kind, flag=" --user" if user else "",
                            config_dir="~/.config/modelherd" if user else "/etc/modelherd",
                            config=CONFIG_NAME, ctl=" --user" if user else "")
    service = _SERVICE.format(exec_start=" ".join(quote(a) for a in command), watchdog=WATCHDOG_SEC)
    if not user:
        group_line = ("# Device nodes' groups (GPU access).\nSupplementaryGroups=" + " ".join(groups) + "\n"
                      if groups else "")
        service += _SYSTEM_ONLY.format(groups=group_line, protect_home=protect_home)
    else:
        service += "# API keys: key_file in the config (~/.config/modelherd/keys.toml, yours only).\n"
    target = "default.target" if user else "multi-user.target"
    return "\n".join([header.rstrip("\n"), "", _UNIT, service, _INSTALL.format(target=target)])


def starter_config(builtin: dict[str, str], *, user: bool = False) -> str:
    """A commented config the daemon accepts as it is: loopback only, the built-in models."""
    models_dir = "~/.local/share/modelherd/models" if user else "/var/lib/modelherd/models"
    keys = ('key_file = "keys.toml"          # API keys: [[keys]] tables in ~/.config/modelherd/keys.toml'
            if user else
            "# API keys come from /etc/modelherd/keys.toml, which the unit passes as a credential.")
    lines = [
        "# modelherd's configuration, written by `modelherd service install`. Every key is",
        "# optional: the README's \"Configuration\" lists them all. After an edit:",
        f"# `systemctl{' --user' if user else ''} reload modelherd` applies models and keys; "
        "host and port need a restart.",
        "",
        "[server]",
        'host = "127.0.0.1"             # "0.0.0.0", or a list of addresses, to serve your network',
        "port = 8080",
        keys,
        "# Models: put *.gguf files (or one folder per model) in",
        f"# {models_dir}, or name the folders to scan:",
        '# models_dirs = ["/srv/models"]',
        "",
        "# The built-in models (what `modelherd serve` offers without a config file); an hf://",
        "# source is downloaded on first use. Remove them, or add your own like them.",
    ]
    for name, source in builtin.items():  # JSON strings are TOML basic strings
        lines += ["", f"[models.{json.dumps(name)}]", f"source = {json.dumps(source)}"]
    return "\n".join(lines) + "\n"


def starter_keys(admin_key: str, *, user: bool = False) -> str:
    """A key file with one admin key (router/keys.py's [[keys]] format)."""
    where = ("the config's key_file" if user else
             "the unit's `keys` credential (LoadCredential=); `systemctl restart modelherd` after an edit")
    return "\n".join([
        "# modelherd's API keys, read through " + where + ".",
        "# Clients send one as `Authorization: Bearer KEY` (or `x-api-key: KEY`). A key's name, never",
        "# the key, shows in logs and metrics. role: \"admin\" (may also load, unload, pull, delete and",
        "# reload) or \"user\" (may use models); `models = [...]` limits a key to those models;",
        "# `key_sha256 = \"...\"` instead of `key` keeps only the key's hash here.",
        "",
        "[[keys]]",
        'name = "admin"',
        f'key = "{admin_key}"',
        'role = "admin"',
        "",
        "# [[keys]]",
        '# name = "alice"',
        '# key_sha256 = "<sha256 of her key, hex>"',
        '# role = "user"',
        "",
    ])

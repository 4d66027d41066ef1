"""`modelherd service install|uninstall`: run the daemon as a systemd service.

install writes the unit (router.unitfile) with this installation's command, a starter
config and a key file with a new admin key when there are none (an existing config or key
file is never overwritten), then runs `systemctl daemon-reload` and `enable --now`.
`--user` does the same with a user unit and `systemctl --user`. `--root DIR` writes into
DIR as if it were / (an image, a package build) and only enables the unit there with
`systemctl --root` (a user unit cannot be enabled that way); nothing is started.
`--dry-run` prints what would be written and run, and changes nothing.

uninstall disables and stops the unit and removes it; the config and keys stay unless
`--purge` is given; models and downloads always stay.

Exit codes a script can rely on: 0 done; 1 a systemctl command failed (its own message
shows above ours); 69 no systemctl, or systemd does not run here; 73 a file could not be
written or removed; 77 a system unit needs root.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from router.builtin import builtin_sources
from router.unitfile import (
    CONFIG_NAME,
    KEYS_NAME,
    UNIT_NAME,
    existing_groups,
    render_unit,
    starter_config,
    starter_keys,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 69  # sysexits' EX_UNAVAILABLE
EXIT_CANT_WRITE = 73  # EX_CANTCREAT
EXIT_NOT_ROOT = 77  # EX_NOPERM


class ServiceError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Places:
    """Where a system or a user unit's files go (under `root` when given)."""

    user: bool
    root: Path | None
    unit: Path
    config: Path
    keys: Path

    @property
    def config_dir(self) -> Path:
        return self.config.parent


def places(user: bool, root: Path | None = None, env: Mapping[str, str] | None = None) -> Places:
    env = os.environ if env is None else env
    if user:
        value = env.get("XDG_CONFIG_HOME", "")
        config_home = Path(value) if value.startswith("/") else Path.home() / ".config"
        unit_dir, config_dir = config_home / "systemd" / "user", config_home / "modelherd"
    else:
        unit_dir, config_dir = Path("/etc/systemd/system"), Path("/etc/modelherd")
    if root is not None:
        root = root.absolute()  # systemctl --root= wants it so
        unit_dir = root / unit_dir.relative_to("/")
        config_dir = root / config_dir.relative_to("/")
    return Places(user, root, unit_dir / UNIT_NAME, config_dir / CONFIG_NAME, config_dir / KEYS_NAME)


def daemon_command() -> list[str]:
    """How systemd starts this installation: the `modelherd` script beside this Python (a
    venv's bin/), else this Python with `-m router`."""
    python = Path(sys.executable).absolute()  # not resolved: a venv's python is a symlink
    script = python.parent / "modelherd"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(python), "-m", "router"]


def _under_home(path: Path) -> bool:
    return any(path.is_relative_to(p) for p in ("/home", "/root", "/run/user"))


def _unreachable_by_others(path: Path) -> Path | None:
    """The first folder above `path` that other users cannot enter, if any: the system
    unit's DynamicUser could not start the daemon from there."""
    for folder in reversed(path.parents):
        try:
            if not folder.stat().st_mode & stat.S_IXOTH:
                return folder
        except OSError:
            return folder
    return None


# ---- the steps, shown by --dry-run or carried out ---------------------------------------


@dataclass(frozen=True)
class Write:
    path: Path
    text: str
    mode: int
    keep_existing: bool = False  # a config or key file someone may have edited
    shown: str | None = None  # what --dry-run prints instead of the text (a secret)
    on_change: str = ""  # said when it replaces a different file


@dataclass(frozen=True)
class Remove:
    path: Path


@dataclass(frozen=True)
class Run:
    argv: list[str]


Step = Write | Remove | Run


def _systemctl(user: bool) -> list[str]:
    return [shutil.which("systemctl") or "systemctl", *(["--user"] if user else [])]


def unit_here(command: Sequence[str], user: bool) -> str:
    """The unit for `command` on this machine: only the GPU groups it has, and home dirs
    read-only rather than hidden when the installation lives in one."""
    return render_unit(command, user=user, groups=existing_groups(),
                       protect_home="read-only" if _under_home(Path(command[0])) else "yes")


def install_steps(where: Places, command: Sequence[str]) -> list[Step]:
    unit = unit_here(command, where.user)
    key = "sk-mh-" + secrets.token_urlsafe(24)
    ctl = " ".join(["systemctl", *(["--user"] if where.user else [])])
    steps: list[Step] = [
        Write(where.unit, unit, 0o644,
              on_change=f"a running modelherd uses the new unit after `{ctl} restart modelherd`"),
        Write(where.config, starter_config(builtin_sources(), user=where.user), 0o644, keep_existing=True),
        # Root-only (the credential is copied for the service); a user's own for a user unit.
        Write(where.keys, starter_keys(key, user=where.user), 0o600, keep_existing=True,
              shown="(a key file with one new admin key, named `admin`)"),
    ]
    if where.root is None:
        steps += [Run([*_systemctl(where.user), "daemon-reload"]),
                  Run([*_systemctl(where.user), "enable", "--now", UNIT_NAME])]
    elif not where.user:  # a user unit cannot be enabled in another root
        steps.append(Run([*_systemctl(False), f"--root={where.root}", "enable", UNIT_NAME]))
    return steps


def uninstall_steps(where: Places, purge: bool) -> list[Step]:
    steps: list[Step] = []
    if where.unit.exists():
        if where.root is None:
            steps.append(Run([*_systemctl(where.user), "disable", "--now", UNIT_NAME]))
        elif not where.user:
            steps.append(Run([*_systemctl(False), f"--root={where.root}", "disable", UNIT_NAME]))
        steps.append(Remove(where.unit))
        if where.root is None:
            steps.append(Run([*_systemctl(where.user), "daemon-reload"]))
    if purge:
        steps += [Remove(where.config), Remove(where.keys), Remove(where.config_dir)]
    return steps


def _show(step: Step, out: TextIO) -> None:
    if isinstance(step, Write):
        what = "unless it exists" if step.keep_existing else ""
        print(f"would write {step.path} (mode {step.mode:04o}) {what}".rstrip() + ":", file=out)
        body = step.shown if step.shown is not None else step.text
        print("    " + body.rstrip("\n").replace("\n", "\n    "), file=out)
    elif isinstance(step, Remove):
        print(f"would remove {step.path}", file=out)
    else:
        print("would run: " + " ".join(step.argv), file=out)


def _carry_out(step: Step, out: TextIO) -> None:
    if isinstance(step, Write):
        if step.keep_existing and step.path.exists():
            print(f"kept {step.path} (it exists)", file=out)
            return
        try:
            changed = step.path.read_text(encoding="utf-8") != step.text
        except OSError:
            changed = False  # new
        _write(step.path, step.text, step.mode)
        print(f"wrote {step.path}" + (f" ({step.on_change})" if changed and step.on_change else ""),
              file=out)
    elif isinstance(step, Remove):
        try:
            if step.path.is_dir():
                step.path.rmdir()  # only when empty: a file of someone else's stays
            else:
                step.path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            if step.path.is_dir():
                print(f"kept {step.path} (not empty)", file=out)
                return
            raise ServiceError(f"cannot remove {step.path}: {exc.strerror}", EXIT_CANT_WRITE) from exc
        print(f"removed {step.path}", file=out)
    else:
        out.flush()
        try:
            code = subprocess.run(step.argv, check=False).returncode
        except OSError as exc:
            raise ServiceError(f"cannot run {step.argv[0]}: {exc.strerror}", EXIT_UNAVAILABLE) from exc
        if code != 0:
            user = " --user" if "--user" in step.argv else ""
            raise ServiceError(f"`{' '.join(step.argv)}` failed (exit code {code}); see `systemctl{user} "
                               f"status modelherd` and `journalctl{user} -u modelherd -e`", EXIT_FAILED)


def _write(path: Path, text: str, mode: int) -> None:
    """Whole or not at all, with its mode from the start (a key file is never readable by
    others, not even for a moment)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror}", EXIT_CANT_WRITE) from exc


# ---- the commands --------------------------------------------------------------------


def _preflight(where: Places) -> None:
    """Why the steps cannot work here, before any is taken."""
    if where.root is not None:
        return
    if not where.user and os.geteuid() != 0:
        raise ServiceError("a system unit needs root: run it with sudo, or use --user for a unit of "
                           "your own", EXIT_NOT_ROOT)
    if shutil.which("systemctl") is None:
        raise ServiceError("systemctl not found: modelherd service needs systemd", EXIT_UNAVAILABLE)
    if not where.user and not Path("/run/systemd/system").is_dir():
        raise ServiceError("systemd is not running on this machine (no /run/systemd/system; a "
                           "container?): run `modelherd serve` directly", EXIT_UNAVAILABLE)


def _run(steps: list[Step], where: Places, dry_run: bool, out: TextIO) -> int:
    try:
        if dry_run:
            for step in steps:
                _show(step, out)
            try:
                _preflight(where)
            except ServiceError as exc:
                print(f"note: without --dry-run this would stop here: {exc}", file=out)
            return EXIT_OK
        _preflight(where)
        for step in steps:
            _carry_out(step, out)
    except ServiceError as exc:
        print(f"modelherd: {exc}", file=sys.stderr)
        return exc.code
    return EXIT_OK


def install(user: bool = False, dry_run: bool = False, root: Path | None = None,
            out: TextIO = sys.stdout) -> int:
    where = places(user, root)
    command = daemon_command()
    if not user and (folder := _unreachable_by_others(Path(command[0]))) is not None:
        print(f"modelherd: warning: other users cannot enter {folder}, so the service's own user "
              f"cannot start {command[0]}; install modelherd elsewhere (e.g. /opt/modelherd)",
              file=sys.stderr)
    code = _run(install_steps(where, command), where, dry_run, out)
    if code == EXIT_OK and not dry_run:
        _summary(where, out)
    return code


def uninstall(user: bool = False, dry_run: bool = False, root: Path | None = None,
              purge: bool = False, out: TextIO = sys.stdout) -> int:
    where = places(user, root)
    steps = uninstall_steps(where, purge)
    if not steps:
        print(f"modelherd: no {UNIT_NAME} at {where.unit}; nothing to do", file=out)
        return EXIT_OK
    code = _run(steps, where, dry_run, out)
    if code == EXIT_OK and not dry_run and not purge and where.config_dir.is_dir():
        print(f"kept {where.config_dir} (config and keys; --purge removes them); models and "
              "downloads stay too", file=out)
    return code


def _summary(where: Places, out: TextIO) -> None:
    ctl = "systemctl --user" if where.user else "systemctl"
    journal = "journalctl --user" if where.user else "journalctl"
    sudo = "" if where.user else "sudo "
    models = "~/.local/share/modelherd/models" if where.user else "/var/lib/modelherd/models"
    state = "installed (enable it there)" if where.user and where.root else (
        "installed and enabled" if where.root else "installed, enabled and started")
    print("", file=out)
    print(f"modelherd is {state}.", file=out)
    print(f"  status:  {ctl} status modelherd", file=out)
    print(f"  config:  {where.config}  (after an edit: {ctl} reload modelherd)", file=out)
    print(f"  keys:    {where.keys}  (the admin key: {sudo}cat {where.keys})", file=out)
    print(f"  models:  put *.gguf files in {models}", file=out)
    print(f"  logs:    {journal} -u modelherd -f  (only warnings and errors: add -p warning)", file=out)

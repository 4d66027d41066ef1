"""The systemd unit and `modelherd service install|uninstall`: the unit verifies and scores
≤ 2.0 on `systemd-analyze security`, an install into a temporary root writes what the daemon
accepts, and uninstall takes it away. No test installs into the real system: systemctl runs
only with --root, and the refusals (not root, no systemctl) stop before anything is written."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from router import service
from router.catalog import build_catalog
from router.config import build_settings
from router.keys import Role, read_key_file
from router.unitfile import GPU_GROUPS, SHIPPED_COMMAND, render_unit
from tests.daemon import REPO

SECURITY_MAX = 2.0


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install systemd (apt-get install systemd; .ci/run does)")
    return path


def verify(unit: Path, user: bool = False) -> None:
    """`systemd-analyze verify` passes and says nothing about the unit (an unknown or
    misspelt setting is only a warning, with exit code 0)."""
    env = dict(os.environ)
    if user:  # a user manager needs a runtime dir, even offline
        runtime = unit.parent / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    out = subprocess.run([analyze(), *(["--user"] if user else []), "verify", str(unit)],
                         capture_output=True, text=True, env=env)
    said = [line for line in (out.stdout + out.stderr).splitlines() if unit.name in line]
    assert out.returncode == 0 and not said, out.stdout + out.stderr


def exposure(unit: Path) -> float:
    out = subprocess.run([analyze(), "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    return float(m.group(1))


def modelherd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], cwd=REPO, capture_output=True,
                          text=True, env=env)


def test_the_unit_runs_this_installation_and_the_shipped_one_is_the_same_unit() -> None:
    command = service.daemon_command()
    assert Path(command[0]).parent == Path(sys.executable).absolute().parent
    unit = render_unit(command)
    assert f"ExecStart={' '.join(command)} serve --config %E/modelherd/config.toml\n" in unit
    # systemd/modelherd.service is the same unit for an install in /opt/modelherd/.venv.
    shipped = (REPO / "systemd" / "modelherd.service").read_text()
    assert shipped == render_unit(SHIPPED_COMMAND, groups=GPU_GROUPS)


def test_system_unit_verifies_and_scores_at_most_2(tmp_path: Path) -> None:
    unit = tmp_path / "modelherd.service"
    unit.write_text(service.unit_here(service.daemon_command(), user=False))  # what install writes
    verify(unit)
    score = exposure(unit)
    assert score <= SECURITY_MAX, score
    shipped = exposure(REPO / "systemd" / "modelherd.service")  # the README quotes this one
    assert shipped <= SECURITY_MAX, shipped
    text = unit.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                 "ConfigurationDirectory=modelherd", "LoadCredential=keys:%E/modelherd/keys.toml",
                 "DevicePolicy=closed", "DeviceAllow=char-nvidia-frontend rw", "DeviceAllow=char-kfd rw",
                 "DeviceAllow=char-drm rw", "DeviceAllow=char-nvidia-uvm rw"):
        assert f"\n{line}\n" in text, line
    assert re.search(r"\nWatchdogSec=\d+\n", text)
    assert "ProcSubset" not in text.replace("Not ProcSubset=pid", "")  # /proc/meminfo must stay
    assert "--api-key" not in text  # keys never on the command line


def test_user_unit_verifies_without_what_a_user_manager_cannot_do(tmp_path: Path) -> None:
    unit = tmp_path / "modelherd.service"
    unit.write_text(service.unit_here(service.daemon_command(), user=True))
    verify(unit, user=True)
    text = unit.read_text()
    for refused in ("DynamicUser=", "SupplementaryGroups=", "CapabilityBoundingSet=", "DeviceAllow=",
                    "ProtectSystem=", "PrivateTmp=", "LimitNOFILE="):
        assert f"\n{refused}" not in text, refused
    assert "Type=notify" in text and "WantedBy=default.target" in text and "SystemCallFilter=" in text


def test_install_into_a_root_writes_what_the_daemon_accepts_and_uninstall_removes_it(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = modelherd("service", "install", "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    unit = root / "etc/systemd/system/modelherd.service"
    config, keys = root / "etc/modelherd/config.toml", root / "etc/modelherd/keys.toml"
    assert unit.read_text() == service.unit_here(service.daemon_command(), user=False)
    # Enabled there by `systemctl --root`; nothing started.
    wants = root / "etc/systemd/system/multi-user.target.wants/modelherd.service"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/modelherd.service"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600  # the credential's source: root only
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    verify(unit)
    # The starter config is one the daemon accepts, and the key file one it reads.
    settings = build_settings(config, {})
    assert [e.name for e in build_catalog(settings)]
    (admin,) = read_key_file(keys)
    assert admin.name == "admin" and admin.role is Role.ADMIN
    assert "sk-mh-" not in r.stdout + r.stderr  # the key is in the file, not on the screen

    # Installing again rewrites the unit but keeps an edited config and the keys.
    config.write_text(config.read_text() + "\n# edited\n")
    before = config.read_text(), keys.read_text()
    r = modelherd("service", "install", "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (config.read_text(), keys.read_text()) == before

    r = modelherd("service", "uninstall", "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not unit.exists() and not wants.is_symlink()
    assert config.exists() and keys.exists() and "--purge" in r.stdout
    r = modelherd("service", "uninstall", "--root", str(root), "--purge")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not config.exists() and not keys.exists() and not config.parent.exists()


def test_user_install_into_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    r = modelherd("service", "install", "--user", "--root", str(root), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    inside = root / home.relative_to("/") / ".config"
    unit = inside / "systemd/user/modelherd.service"
    verify(unit, user=True)
    # A user unit's keys come from the config's key_file (the user's own file).
    settings = build_settings(inside / "modelherd/config.toml", {})
    assert [k.name for k in settings.keys] == ["admin"]
    assert stat.S_IMODE((inside / "modelherd/keys.toml").stat().st_mode) == 0o600
    r = modelherd("service", "uninstall", "--user", "--root", str(root), env=env)
    assert r.returncode == 0 and not unit.exists(), r.stdout + r.stderr


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = modelherd("service", "install", "--dry-run", "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would write " + str(root / "etc/systemd/system/modelherd.service") in r.stdout
    assert "Type=notify" in r.stdout and "[models." in r.stdout  # the unit and the config, shown
    assert f"would run: {shutil.which('systemctl') or 'systemctl'} --root={root} enable modelherd.service" \
        in r.stdout
    assert "sk-mh-" not in r.stdout  # the key file is described, not shown
    assert not root.exists()
    r = modelherd("service", "install", "--dry-run")  # the real system: still only printed
    assert r.returncode == 0 and "would run: " in r.stdout and "enable --now modelherd.service" in r.stdout


def test_a_system_unit_needs_root(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    # In this process, as a user that is not root (this Python lives under /root here: a
    # subprocess as `nobody` could not even start). Nothing may be carried out either way.
    def never(*args: object) -> None:
        raise AssertionError("a refused install carried out a step")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(service, "_carry_out", never)
    assert service.install() == service.EXIT_NOT_ROOT
    assert service.uninstall() in (service.EXIT_NOT_ROOT, service.EXIT_OK)  # OK: nothing installed
    err = capsys.readouterr().err
    assert "needs root" in err and "--user" in err


def test_without_systemctl_install_says_so(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / ".config")}
    r = modelherd("service", "install", "--user", env=env)
    assert r.returncode == service.EXIT_UNAVAILABLE, r.stdout + r.stderr
    assert "systemctl not found" in r.stderr
    assert not home.exists()  # refused before anything was written

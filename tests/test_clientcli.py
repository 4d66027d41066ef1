"""The client commands (`modelherd --version`, `ps`, `ls`, `load`, `unload`, `rm`, `pull`), each
run as a real subprocess against a live daemon, exit codes included."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.daemon import REPO, Daemon
from tests.fileserver import FileServer, file_server

ADMIN, USER = "sk-cli-admin-001", "sk-cli-user-0002"
# Exit codes a script can use (router.clientargs).
OK, FAILED, USAGE, UNREACHABLE, REFUSED = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def hub(models_dir: Path) -> Iterator[FileServer]:
    with file_server() as server:
        gguf = (models_dir / "tiny-a.gguf").read_bytes()
        server.add("/org/tiny/resolve/main/pulled.gguf", gguf, chunk_delay=0.02)
        server.add("/org/tiny/resolve/main/bysource.gguf", gguf)
        server.add("/org/tiny/resolve/main/here.gguf", gguf)
        yield server


@pytest.fixture(scope="module")
def daemon_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("daemon-cache")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, hub: FileServer, daemon_cache: Path,
           isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("clientcli") / "c.toml"
    (config.parent / "broken.bin").write_bytes(b"scripted")
    config.write_text(f"""
[server]
models_dirs = []
cache_dir = "{daemon_cache}"
heartbeat_interval = 0.2

[[keys]]
name = "ops"
key = "{ADMIN}"
role = "admin"

[[keys]]
name = "alice"
key = "{USER}"

[models.tiny]
source = "{models_dir / 'tiny-a.gguf'}"
aliases = ["small-one"]
n_ctx = 512

[models.pulled]
source = "hf://org/tiny/pulled.gguf"

[models.bysource]
source = "hf://org/tiny/bysource.gguf"

[models.broken]
source = "{config.parent / 'broken.bin'}"
backend = "scripted"
options = {{ fail_load = "weights are corrupt" }}
""")
    with Daemon("--config", str(config), env={**isolated_env, "HF_ENDPOINT": hub.url}) as d:
        yield d


@pytest.fixture
def cli_env(tmp_path: Path, hub: FileServer) -> dict[str, str]:
    """The CLI's own environment: its own cache (a download made here, not by the daemon, lands
    there) and nothing that names a daemon."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELHERD_")}
    return {**env, "XDG_CACHE_HOME": str(tmp_path / "cli-cache"), "HF_ENDPOINT": hub.url,
            "COLUMNS": "200"}


def modelherd(*args: str, env: dict[str, str], url: str | None = None, key: str | None = ADMIN,
              timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(env)
    if url is not None:
        env["MODELHERD_URL"] = url
    if key is not None:
        env["MODELHERD_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "router", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def rows(out: str) -> dict[str, list[str]]:
    """A table's rows by their first column (the header's too)."""
    return {cols[0]: cols for line in out.splitlines() if (cols := line.split())}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_version(cli_env: dict[str, str]) -> None:
    done = modelherd("--version", env=cli_env)
    assert done.returncode == OK
    assert done.stdout.strip() == f"modelherd {version('modelherd')}"


def test_ls_lists_every_model_with_its_source_size_and_cache(served: Daemon, cli_env: dict[str, str],
                                                            models_dir: Path) -> None:
    done = modelherd("ls", env=cli_env, url=served.url)
    assert done.returncode == OK, done.stderr
    table = rows(done.stdout)
    assert table["NAME"] == ["NAME", "BACKEND", "SIZE", "CACHED", "STATE", "SOURCE"]
    assert table["tiny"][3:] == ["local", "unloaded", str(models_dir / "tiny-a.gguf")]
    assert table["tiny"][2].endswith("KiB")
    assert table["bysource"][-1] == "hf://org/tiny/bysource.gguf"
    as_json = modelherd("ls", "--json", env=cli_env, url=served.url)
    assert as_json.returncode == OK
    assert '"id": "pulled"' in as_json.stdout


def test_load_ps_and_unload(served: Daemon, cli_env: dict[str, str]) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    done = modelherd("load", "small-one", env=cli_env, url=served.url)  # an alias
    assert done.returncode == OK, done.stderr
    assert done.stdout.startswith("tiny: loaded on cpu")
    loaded = served.models(**admin)["tiny"]
    assert loaded["status"]["value"] == "loaded"  # type: ignore[index]
    assert "tiny: load" in done.stderr  # the load's bar, from /models/sse

    ps = modelherd("ps", env=cli_env, url=served.url)
    assert ps.returncode == OK, ps.stderr
    table = rows(ps.stdout)
    assert table["NAME"] == ["NAME", "STATE", "DEVICE", "MEMORY", "SLOTS", "RUNNING", "WAITING", "IDLE",
                             "PID"]
    assert table["tiny"][1:3] == ["loaded", "cpu"]
    assert table["tiny"][-1] == str(loaded["pid"])
    assert "pulled" not in table  # ps lists what holds a worker only

    done = modelherd("unload", "tiny", env=cli_env, url=served.url)
    assert done.returncode == OK, done.stderr
    assert done.stdout.strip() == "tiny: unloaded"
    assert served.models(**admin)["tiny"]["status"]["value"] == "unloaded"  # type: ignore[index]
    assert "tiny" not in rows(modelherd("ps", env=cli_env, url=served.url).stdout)


def test_pull_goes_through_the_daemon_and_rm_deletes_the_files(
        served: Daemon, cli_env: dict[str, str], hub: FileServer, daemon_cache: Path, tmp_path: Path) -> None:
    mark = served.mark()
    done = modelherd("pull", "pulled", env=cli_env, url=served.url)
    assert done.returncode == OK, done.stderr
    landed = Path(done.stdout.strip())
    assert landed.is_file() and landed.is_relative_to(daemon_cache)  # the daemon's cache, not ours
    assert not (tmp_path / "cli-cache").exists()
    assert hub.seen("/org/tiny/resolve/main/pulled.gguf")
    assert "pulled.gguf" in done.stderr  # its bar, from the feed's download_progress
    served.wait_for_log(r"POST /models/pull 200", start=mark)
    assert rows(modelherd("ls", env=cli_env, url=served.url).stdout)["pulled"][3] == "yes"

    # A source the daemon has a model for is that model's pull.
    done = modelherd("pull", "hf://org/tiny/bysource.gguf", env=cli_env, url=served.url)
    assert done.returncode == OK, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(daemon_cache)

    done = modelherd("rm", "pulled", env=cli_env, url=served.url)
    assert done.returncode == OK, done.stderr
    assert done.stdout.startswith("pulled: removed ")
    assert not landed.exists()
    assert rows(modelherd("ls", env=cli_env, url=served.url).stdout)["pulled"][3] == "no"


def test_pull_without_a_daemon_downloads_here(cli_env: dict[str, str], tmp_path: Path) -> None:
    """No --url nor $MODELHERD_URL, and nothing answers at the config's port: as before, here."""
    config = tmp_path / "c.toml"
    config.write_text(f"[server]\nport = {closed_port()}\n")
    done = modelherd("pull", "hf://org/tiny/here.gguf", "--config", str(config), env=cli_env, key=None)
    assert done.returncode == OK, done.stderr
    assert "downloading here" in done.stderr
    landed = Path(done.stdout.strip())
    assert landed.is_file() and landed.is_relative_to(tmp_path / "cli-cache")


def test_no_daemon_at_the_url_is_exit_3(cli_env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    for args in (["ps"], ["ls"], ["load", "tiny"], ["unload", "tiny"], ["rm", "tiny"], ["pull", "tiny"]):
        done = modelherd(*args, env=cli_env, url=url)
        assert done.returncode == UNREACHABLE, (args, done.stderr)
        assert f"cannot reach modelherd at {url}" in done.stderr
    done = modelherd("ps", "--url", url, env=cli_env)
    assert done.returncode == UNREACHABLE


def test_a_refused_key_is_exit_4(served: Daemon, cli_env: dict[str, str]) -> None:
    wrong = modelherd("ps", env=cli_env, url=served.url, key="sk-not-a-key-at-all")
    assert wrong.returncode == REFUSED
    assert "401" in wrong.stderr and "MODELHERD_API_KEY" in wrong.stderr
    assert modelherd("ls", env=cli_env, url=served.url, key=None).returncode == REFUSED
    # A user key may list models but not load, unload, pull or delete them (403).
    assert modelherd("ls", env=cli_env, url=served.url, key=USER).returncode == OK
    for args in (["load", "tiny"], ["unload", "tiny"], ["rm", "pulled"], ["pull", "pulled"]):
        done = modelherd(*args, env=cli_env, url=served.url, key=USER)
        assert done.returncode == REFUSED, (args, done.stderr)
        assert "403" in done.stderr


def test_a_failed_operation_is_exit_1_and_bad_usage_exit_2(served: Daemon, cli_env: dict[str, str]) -> None:
    unknown = modelherd("load", "no-such-model", env=cli_env, url=served.url)
    assert unknown.returncode == FAILED
    assert "no model 'no-such-model'" in unknown.stderr
    broken = modelherd("load", "broken", env=cli_env, url=served.url)
    assert broken.returncode == FAILED
    assert "weights are corrupt" in broken.stderr
    local = modelherd("rm", "tiny", env=cli_env, url=served.url)  # not a download: its files stay
    assert local.returncode == FAILED
    assert "local path" in local.stderr
    assert modelherd("ps", env=cli_env, url="not-a-url").returncode == USAGE
    assert modelherd("load", env=cli_env, url=served.url).returncode == USAGE  # no NAME
    assert modelherd("ps", "--config", "/nonexistent/modelherd.toml", env=cli_env).returncode == USAGE

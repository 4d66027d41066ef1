"""Keys with roles and models, and a reload without a restart (SIGHUP and POST /models/reload):
models appear, go once idle and change, keys change at once, a bad config changes nothing."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import httpx
import pytest

from tests.daemon import Daemon

ADMIN, USER, LIMITED = "sk-admin-key-1", "sk-user-key-22", "sk-limited-333"
ADMIN_ROUTES = [("POST", "/models/load", {"model": "tiny-a"}),
                ("POST", "/models/unload", {"model": "tiny-a"}),
                ("POST", "/models/pull", {"model": "tiny-a"}), ("POST", "/models", {"model": "tiny-a"}),
                ("DELETE", "/models?model=tiny-a", None), ("POST", "/models/prune", None),
                ("POST", "/models/reload", None)]


def config(models_dir: Path, extra: str = "") -> str:
    return f"""
[server]
models_dirs = []
api_keys = ["{ADMIN}"]

[[keys]]
name = "alice"
key = "{USER}"

[[keys]]
name = "kiosk"
key_sha256 = "{hashlib.sha256(LIMITED.encode()).hexdigest()}"
models = ["tiny-b"]

[models.tiny-a]
source = "{models_dir / 'tiny-a.gguf'}"
n_ctx = 256

[models.tiny-b]
source = "{models_dir / 'tiny-b.gguf'}"
n_ctx = 256
{extra}
"""


def client(d: Daemon, key: str) -> httpx.Client:
    return httpx.Client(base_url=d.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def models(c: httpx.Client) -> dict[str, dict[str, object]]:
    return {m["id"]: m for m in c.get("/models").json()["data"]}


def chat(c: httpx.Client, model: str) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def keyed(tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> tuple[Daemon, Path]:
    path = tmp_path / "c.toml"
    path.write_text(config(models_dir))
    return Daemon("--config", str(path), env=isolated_env), path


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_a_user_key_may_not_manage_models(keyed: tuple[Daemon, Path], method: str, path: str,
                                          body: dict[str, str] | None) -> None:
    d, _ = keyed
    with d, client(d, USER) as c:
        r = c.request(method, path, json=body)
        assert r.status_code == 403, r.text
        error = r.json()["error"]
        assert error["type"] == "permission_error" and "alice" in error["message"]
        assert USER not in r.text  # the key's name, never the key
        assert chat(c, "tiny-a").status_code == 200  # using models is what a user key is for


def test_a_key_limited_to_some_models_sees_no_others(keyed: tuple[Daemon, Path]) -> None:
    d, _ = keyed
    with d, client(d, LIMITED) as c:
        assert chat(c, "tiny-b").status_code == 200
        hidden = chat(c, "tiny-a")
        assert hidden.status_code == 404 and hidden.json()["error"]["type"] == "not_found_error"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-b"]
        assert c.get("/v1/models/tiny-a").status_code == 404


def test_reload_adds_removes_and_changes_models_and_keys(keyed: tuple[Daemon, Path],
                                                         models_dir: Path) -> None:
    d, path = keyed
    with d, client(d, ADMIN) as admin, client(d, USER) as user:
        assert chat(admin, "tiny-b").status_code == 200
        pid = models(admin)["tiny-b"]["pid"]
        # tiny-a goes, tiny-c appears, tiny-b's context changes; alice's key is withdrawn.
        new = config(models_dir).replace('[models.tiny-a]\nsource', '[models.tiny-c]\nsource')
        new = new.replace('n_ctx = 256\n\n[models.tiny-b]', 'n_ctx = 256\n\n[models.tiny-b]', 1)
        tiny_b = f'"{models_dir / "tiny-b.gguf"}"'
        new = new.replace(f"{tiny_b}\nn_ctx = 256", f"{tiny_b}\nn_ctx = 512")
        new = new.replace(f'[[keys]]\nname = "alice"\nkey = "{USER}"\n', "")
        path.write_text(new)
        mark = d.mark()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log(r"configuration reloaded: 2 model\(s\): tiny-c, tiny-b", start=mark)
        assert user.get("/v1/models").status_code == 401  # key changes apply at once
        assert sorted(m["id"] for m in admin.get("/v1/models").json()["data"]) == ["tiny-b", "tiny-c"]
        d.wait_until(lambda: models(admin)["tiny-b"]["pid"] != pid, "tiny-b reloaded once idle")
        assert chat(admin, "tiny-b").status_code == 200
        assert models(admin)["tiny-b"]["meta"]["n_ctx"] == 512  # type: ignore[index]
        assert chat(admin, "tiny-c").status_code == 200
        # A broken file is reported and changes nothing.
        path.write_text(new + "\n[server.nonsense]\n")
        r = admin.post("/models/reload")
        assert r.status_code == 400 and "running configuration stays" in r.json()["error"]["message"]
        assert chat(admin, "tiny-c").status_code == 200

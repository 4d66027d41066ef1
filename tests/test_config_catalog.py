"""Settings, config validation and models-dir discovery (no processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.catalog import Catalog, Policy, build_catalog, discover
from router.config import ConfigError, build_settings, default_models_dir
from tests.daemon import REPO, Daemon


def test_builtin_defaults() -> None:
    s = build_settings(None, {})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert s.server.autoload is True
    assert s.server.max_body_bytes == 16 * 1024 * 1024
    assert s.models_dirs == [default_models_dir()] and s.default_models_dir


def test_default_models_dir_follows_systemd_then_xdg() -> None:
    assert default_models_dir({"STATE_DIRECTORY": "/var/lib/modelherd"}) == Path("/var/lib/modelherd/models")
    assert default_models_dir({"XDG_DATA_HOME": "/d"}) == Path("/d/modelherd/models")
    assert default_models_dir({}) == Path.home() / ".local/share/modelherd/models"


def test_flags_override_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\napi_keys = ["a"]\nmodels_dirs = ["m"]\n')
    s = build_settings(cfg, {"port": 9100, "host": None, "api_keys": ["b"], "models_dirs": None})
    assert (s.server.host, s.server.port, s.server.api_keys) == ("0.0.0.0", 9100, ["b"])
    assert s.models_dirs == [tmp_path / "m"]  # relative to the config file


@pytest.mark.parametrize(("text", "needles"), [
    ("[server]\nport = 'abc'\n", ["server.port", "int"]),
    ("[server]\nport = 70000\n", ["server.port", "65535"]),
    ("[server]\nprot = 1\n", ["prot", "unknown"]),
    ("[models.m]\nn_ctx = 5\n", ["models.m", "source"]),
    ("[models.m]\nsource = 'x.gguf'\nbackend = 'vllm'\n", ["models.m.backend"]),
    ("[models.m]\nsource = 'hf://a/b/c.gguf'\nsha256 = 'xyz'\n", ["models.m.sha256"]),
    ("[defaults]\nn_threads = -1\n", ["defaults.n_threads"]),
    ("[server\n", ["not valid TOML"]),
    ("[server]\nmax_models = -1\n", ["server.max_models", ">= 0"]),
    ("[server]\nmax_queue = 0\n", ["server.max_queue", ">= 1"]),
    ("[server]\nidle_ttl = -5\n", ["server.idle_ttl"]),
    ("[models.m]\nsource = 'x.gguf'\nttl = -1\n", ["models.m.ttl"]),
    ("[models.m]\nsource = 'x.gguf'\npinned = 'yes'\n", ["models.m.pinned", "bool"]),
    ("[server]\nstream_buffer_bytes = 100\n", ["server.stream_buffer_bytes", ">= 1024"]),
    ("[server]\nstream_retention = -1\n", ["server.stream_retention"]),
    ("[server]\nmax_conversations = 0\n", ["server.max_conversations", ">= 1"]),
    ("[server]\nstream_fanout_timeout = 0\n", ["server.stream_fanout_timeout", "> 0"]),
])
def test_invalid_config_names_the_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        build_settings(cfg, {})
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_invalid_config_exits_nonzero_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nport = 'abc'\n")
    out = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "server.port" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(tmp_path / "no.toml")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr


def test_relative_dirs_resolve_against_file_or_cwd(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nmodels_dirs = ["in-file"]\n')
    assert build_settings(cfg, {}).models_dirs == [tmp_path / "in-file"]
    assert build_settings(cfg, {"models_dirs": ["on-cli"]}).models_dirs == [Path.cwd() / "on-cli"]


def test_unknown_backend_option_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.m]\nsource = "m.gguf"\noptions = { flash_atn = true }\n')
    with pytest.raises(ConfigError) as info:
        build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]}))
    assert "models.m.options" in str(info.value) and "flash_atn" in str(info.value)
    assert "flash_attn" in str(info.value)  # the known names are listed
    cfg.write_text('[defaults]\noptions = { nope = 1 }\n')
    with pytest.raises(ConfigError, match=r"defaults\.options"):
        build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]}))


def test_alias_clash_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.a]\nsource = "a.gguf"\naliases = ["x"]\n[models.b]\nsource = "b.gguf"\n'
                   'aliases = ["x"]\n')
    with pytest.raises(ConfigError, match="already names model"):
        build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]}))


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")


def test_discovery_like_llama_server(tmp_path: Path) -> None:
    _touch(tmp_path / "plain.gguf")
    _touch(tmp_path / "mmproj-plain.gguf")  # a top-level projector is not a model
    _touch(tmp_path / "split-00001-of-00002.gguf")
    _touch(tmp_path / "split-00002-of-00002.gguf")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "vision" / "model-q4.gguf")
    _touch(tmp_path / "vision" / "mmproj-f16.gguf")
    _touch(tmp_path / "big" / "big-00002-of-00003.gguf")
    _touch(tmp_path / "big" / "big-00001-of-00003.gguf")
    _touch(tmp_path / "big" / "big-00003-of-00003.gguf")
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "qwen-mlx" / "config.json")  # an MLX folder: config.json and safetensors
    _touch(tmp_path / "qwen-mlx" / "model.safetensors")
    _touch(tmp_path / "half-mlx" / "config.json")  # no weights: not a model
    _touch(tmp_path / "both" / "config.json")  # GGUF files win, as before MLX was served
    _touch(tmp_path / "both" / "model.safetensors")
    _touch(tmp_path / "both" / "both-q4.gguf")
    found = {f.name: (f.path.name, f.mmproj.name if f.mmproj else None, f.backend)
             for f in discover(tmp_path)}
    assert found == {
        "plain": ("plain.gguf", None, "llama_cpp"),
        "split-00001-of-00002": ("split-00001-of-00002.gguf", None, "llama_cpp"),
        "vision": ("model-q4.gguf", "mmproj-f16.gguf", "llama_cpp"),
        "big": ("big-00001-of-00003.gguf", None, "llama_cpp"),
        "qwen-mlx": ("qwen-mlx", None, "mlx"),
        "both": ("both-q4.gguf", None, "llama_cpp"),
    }
    assert discover(tmp_path / "missing") == []


def test_the_backend_follows_the_source_unless_set(tmp_path: Path) -> None:
    _touch(tmp_path / "folder" / "config.json")
    _touch(tmp_path / "folder" / "model-00001-of-00002.safetensors")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.g]\nsource = "G.GGUF"\n[models.m]\nsource = "folder"\n'
                   '[models.forced]\nsource = "folder"\nbackend = "llama_cpp"\n'
                   '[models.auto]\nsource = "folder"\nbackend = "auto"\n'
                   # Not there yet (an unmounted disk): the daemon starts, its load will fail.
                   '[models.later]\nsource = "Qwen2.5-0.5B-Instruct-4bit"\n')
    catalog = build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]}))
    backends = {e.name: (e.backend, e.worker.backend) for e in catalog}
    assert backends == {"g": ("llama_cpp", "llama_cpp"), "m": ("mlx", "mlx"),
                        "forced": ("llama_cpp", "llama_cpp"), "auto": ("mlx", "mlx"),
                        "later": ("mlx", "mlx")}
    _touch(tmp_path / "weights.bin")
    cfg.write_text('[models.x]\nsource = "weights.bin"\n')
    with pytest.raises(ConfigError, match=r"models\.x\.backend: cannot tell .* set backend"):
        build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]}))


def test_defaults_options_reach_only_the_backends_that_have_them(tmp_path: Path) -> None:
    _touch(tmp_path / "models" / "g.gguf")
    _touch(tmp_path / "models" / "m" / "config.json")
    _touch(tmp_path / "models" / "m" / "model.safetensors")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[defaults]\noptions = { n_batch = 64, prompt_cache_slots = 2 }\n')
    catalog = build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "models")]}))
    options = {e.name: e.worker.options for e in catalog}
    assert options == {"g": {"n_batch": 64}, "m": {"prompt_cache_slots": 2}}
    # On the model itself, an option of the other backend is a mistake.
    cfg.write_text(f'[models.m]\nsource = "{tmp_path}/models/m"\noptions = {{ n_batch = 64 }}\n')
    with pytest.raises(ConfigError, match=r"models\.m\.options: unknown mlx option\(s\) n_batch"):
        build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]}))
    for key, value in (("chat_format", '"chatml"'), ("mmproj", '"p.gguf"'), ("n_gpu_layers", "-1")):
        cfg.write_text(f'[models.m]\nsource = "{tmp_path}/models/m"\n{key} = {value}\n')
        with pytest.raises(ConfigError, match=rf"models\.m\.{key}: a llama_cpp setting"):
            build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]}))
    # In [defaults] they are for the GGUF models, and an MLX model takes none of them.
    cfg.write_text('[defaults]\nn_gpu_layers = -1\nchat_format = "chatml"\n')
    settings = build_settings(cfg, {"models_dirs": [str(tmp_path / "models")]})
    entries = {e.name: e.worker for e in build_catalog(settings)}
    assert (entries["g"].n_gpu_layers, entries["g"].chat_format) == (-1, "chatml")
    assert (entries["m"].n_gpu_layers, entries["m"].chat_format) == (0, None)


def test_catalog_config_overrides_discovered_and_resolves_aliases(tmp_path: Path) -> None:
    _touch(tmp_path / "models" / "m.gguf")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[defaults]\nn_ctx = 1024\n[models.m]\nsource = "other.gguf"\naliases = ["em"]\n'
                   'n_ctx = 64\noptions = { n_batch = 32 }\n')
    catalog: Catalog = build_catalog(build_settings(cfg, {"models_dirs": [str(tmp_path / "models")]}))
    entry = catalog.resolve("em")
    assert entry is not None and entry is catalog.resolve("m")
    assert entry.path == tmp_path / "other.gguf" and entry.origin == "config"
    assert entry.worker.n_ctx == 64 and entry.worker.options == {"n_batch": 32}
    assert catalog.resolve("nope") is None


def test_no_config_serves_default_models_dir(tmp_path: Path, models_dir: Path) -> None:
    data = tmp_path / "data"
    default_dir = data / "modelherd" / "models"
    default_dir.mkdir(parents=True)
    (default_dir / "found.gguf").write_bytes((models_dir / "tiny-a.gguf").read_bytes())
    with Daemon(env={"XDG_DATA_HOME": str(data), "XDG_RUNTIME_DIR": str(tmp_path)}) as d:
        d.wait_for_log(rf"models dir: {default_dir}")
        models = d.models()  # what it found, and the built-in models (no config file)
        assert models["found"]["origin"] == "models_dir"
        assert {m["origin"] for name, m in models.items() if name != "found"} == {"builtin"}
        with d.client() as c:
            r = c.post("/v1/completions", json={"model": "found", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_cli_accepts_several_values_per_flag_and_repeated_flags() -> None:
    from router.cli import _parser

    args = _parser().parse_args(["serve", "--models-dir", "a", "b", "--models-dir", "c",
                                 "--api-key", "k1", "--api-key", "k2", "k3", "--no-autoload"])
    assert args.models_dirs == ["a", "b", "c"]
    assert args.api_keys == ["k1", "k2", "k3"]
    assert args.autoload is False
    assert _parser().parse_args(["serve"]).autoload is None  # unset: the file or the default decides


def test_pinned_and_startup_models_must_fit_max_models(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nmax_models = 1\nmodels_dirs = []\n"
                   "[models.a]\nsource = 'a.gguf'\npinned = true\n"
                   "[models.b]\nsource = 'b.gguf'\nload_on_startup = true\n"
                   "[models.c]\nsource = 'c.gguf'\n")
    out = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "server.max_models: 1 is fewer than the 2 pinned or load_on_startup models (a, b)" in out.stderr
    # The flag overrides the file, and two places are enough.
    settings = build_settings(cfg, {"max_models": 2})
    catalog = build_catalog(settings)
    policies = {e.name: e.policy for e in catalog}
    assert policies["a"].pinned and policies["b"].load_on_startup and policies["c"] == Policy()


def test_model_policy_inherits_server_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nidle_ttl = 60\nmax_queue = 8\nmodels_dirs = []\n"
                   "[models.a]\nsource = 'a.gguf'\n"
                   "[models.b]\nsource = 'b.gguf'\nttl = 0\nmax_queue = 2\n")
    policies = {e.name: e.policy for e in build_catalog(build_settings(cfg, {}))}
    assert policies["a"] == Policy(ttl=60, max_queue=8)
    assert policies["b"] == Policy(ttl=0, max_queue=2)


def test_the_cache_dir_comes_from_the_flag_the_file_systemd_or_xdg(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build_settings(None, {}).cache_dir == tmp_path / "xdg" / "modelherd"
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}/systemd:{tmp_path}/other")
    assert build_settings(None, {}).cache_dir == tmp_path / "systemd"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\ncache_dir = "in-file"\n')
    assert build_settings(cfg, {}).cache_dir == tmp_path / "in-file"
    assert build_settings(cfg, {"cache_dir": "on-cli"}).cache_dir == Path.cwd() / "on-cli"


def test_remote_sources_are_cached_by_source_and_name_their_backend(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'''[server]\ncache_dir = "{tmp_path}/cache"\n
[models.g]\nsource = "hf://org/repo/sub/m-Q4.gguf@v1.0"\nsha256 = "{'A' * 64}"\n
[models.m]\nsource = "hf://org/repo-mlx"\n
[models.u]\nsource = "https://example.com/files/m.gguf?token=abc"\n''')
    settings = build_settings(cfg, {"models_dirs": [str(tmp_path / "none")]})
    entries = {e.name: e for e in build_catalog(settings)}
    g, m, u = entries["g"], entries["m"], entries["u"]
    assert g.path == tmp_path / "cache" / "hf" / "org" / "repo" / "v1.0" / "sub" / "m-Q4.gguf"
    assert g.backend == "llama_cpp" and g.worker.download is not None
    assert g.worker.download.sha256 == "a" * 64 and g.worker.download.cache_dir == str(tmp_path / "cache")
    assert m.path == tmp_path / "cache" / "hf" / "org" / "repo-mlx" / "main" and m.backend == "mlx"
    assert u.backend == "llama_cpp" and u.path.name == "m.gguf" and "token" not in str(u.path)
    cfg.write_text('[models.x]\nsource = "hf://org/repo"\nsha256 = "' + "a" * 64 + '"\n')
    with pytest.raises(ConfigError, match="no one checksum"):
        build_catalog(build_settings(cfg, {}))
    cfg.write_text('[models.x]\nsource = "https://example.com/weights"\n')
    with pytest.raises(ConfigError, match="cannot tell which backend"):
        build_catalog(build_settings(cfg, {}))

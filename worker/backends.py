"""Which library serves a model: each backend's module is imported only when a worker
is configured for it, so a worker loads exactly one (and a missing one says how to
install it)."""

from __future__ import annotations

from worker.backend import Backend


class BackendMissing(Exception):
    """The backend's library is not installed in this environment."""


# The extra that installs each backend's library, for the error that says what to do.
_EXTRAS = {"llama_cpp": (("llama_cpp",), "llama"), "mlx": (("mlx_lm", "mlx"), "mlx")}


def make_backend(name: str) -> Backend:
    """Import the backend library lazily: a worker loads exactly one."""
    try:
        if name == "llama_cpp":
            from worker.llama_backend import LlamaBackend

            return LlamaBackend()
        if name == "mlx":
            from worker.mlx_backend import MlxBackend

            return MlxBackend()
    except ImportError as exc:
        modules, extra = _EXTRAS[name]
        # Only the library itself missing is an install problem; anything else
        # (a broken native build, a missing system library) is reported as it is.
        if exc.name is None or exc.name.split(".")[0] not in modules:
            raise
        raise BackendMissing(
            f"the {name} backend needs {exc.name.split('.')[0]}, which is not installed: "
            f"install modelherd[{extra}] (pip install 'modelherd[{extra}]')") from exc
    if name == "scripted":
        from worker.scripted_backend import ScriptedBackend

        return ScriptedBackend()
    raise ValueError(f"unknown backend {name!r} (known: llama_cpp, mlx, scripted)")

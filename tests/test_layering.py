"""DESIGN.md's layering rules, checked on the source and on what importing pulls in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.daemon import REPO

ALLOWED = {
    "protocol": {"protocol", "msgspec"},
    "worker": {"protocol", "worker", "zmq", "msgspec", "llama_cpp", "jinja2", "mlx", "mlx_lm", "numpy"},
    "router": {"protocol", "router", "zmq", "msgspec", "starlette", "uvicorn", "uvloop", "psutil",
               "multiprocess", "prometheus_client",
               "httpx", "rich"},  # the client commands only (router.client, router.clientcli)
}


# The spawn trampoline names the worker entry point; it runs only in the child
# (the second test checks the router process never imports `worker`).
EXEMPT = {"router/launch.py": {"worker"}}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_packages_import_only_what_their_layer_allows() -> None:
    stdlib = set(sys.stdlib_module_names)
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).glob("*.py")):
            extra = _imports(path) - stdlib - allowed - EXEMPT.get(str(path.relative_to(REPO)), set())
            assert not extra, f"{path.relative_to(REPO)} imports {sorted(extra)}"


def test_router_process_never_loads_a_backend_and_worker_never_loads_http() -> None:
    code = ("import sys, router.app, router.server, router.supervisor, router.launch; "
            "print(sorted(m for m in ('llama_cpp', 'mlx', 'mlx_lm', 'worker') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = ("import sys, worker.main, worker.link; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # the backend is imported only once a model is configured


def _project_imports(path: Path) -> set[str]:
    """The project modules a file imports (any depth: lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in ALLOWED:  # `from router import models_api`
                names |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module.split(".")[0] in ALLOWED:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] in ALLOWED}
    return names


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {f"{p.parent.name}.{p.stem}": _project_imports(p)
             for package in ALLOWED for p in (REPO / package).glob("*.py")}
    cycles = []

    def visit(module: str, path: list[str], done: set[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in done:
                done.add(dep)
                visit(dep, [*path, dep], done)

    for module in sorted(graph):
        visit(module, [module], {module})
    assert cycles == []

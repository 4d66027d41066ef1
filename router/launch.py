"""The spawn target for worker processes.

multiprocess pickles the target by reference, so the router must be able to
name it; naming `worker.main.run` would import the worker package into the
router. This trampoline imports it only in the child.
"""

from __future__ import annotations

from typing import Any


def run_worker(*args: Any) -> None:
    from worker.main import run

    run(*args)


def run_pull(*args: Any) -> None:
    from worker.download import pull

    pull(*args)

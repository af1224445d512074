"""Running one stage as a workflow job or from the command line: logging to the job's log, one-line errors."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import socket
import sys
import time
from typing import Any, Callable, TypeVar

from .errors import PipelineError

T = TypeVar("T")
log = logging.getLogger("neuron_embeddings")


def run_stage(name: str, fn: Callable[[], T], log_path: str | None = None, threads: int | None = None) -> T:
    """Run fn with logging (and progress bars) going to log_path; a PipelineError becomes exit 1 and one line."""
    console = sys.stderr
    handle = open(log_path, "w", buffering=1) if log_path else None
    hook = None
    try:
        with contextlib.redirect_stderr(handle) if handle else contextlib.nullcontext():
            logging.basicConfig(
                level=logging.INFO, stream=sys.stderr, force=True,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            configure = _torch_settings(threads)
            if "torch" in sys.modules:
                configure(sys.modules["torch"])
            else:  # a numpy-only stage never pays torch's import (seconds); one that imports it later is set then
                hook = _OnImport("torch", configure)
                sys.meta_path.insert(0, hook)
            start = time.perf_counter()
            log.info("stage %s: start on %s%s", name, socket.gethostname(), _placement())
            try:
                result = fn()
            except PipelineError as exc:
                log.error("%s", exc)
                print(f"error: {exc}", file=console)
                raise SystemExit(1) from None
            except Exception:
                log.exception("stage %s failed", name)
                raise
            log.info("stage %s: done in %.1f s: %s", name, time.perf_counter() - start, result)
            return result
    finally:
        if hook is not None and hook in sys.meta_path:
            sys.meta_path.remove(hook)
        if handle:
            handle.close()


def _torch_settings(threads: int | None) -> Callable[[Any], None]:
    """What every stage that uses torch runs under: the rule's threads, deterministic algorithms where torch has them."""

    def configure(torch: Any) -> None:
        if threads:
            torch.set_num_threads(threads)
        deterministic(torch)

    return configure


def deterministic(torch: Any) -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True), without the 2 s import of torch._inductor that the
    public call makes to set inductor's own flag: no stage compiles, and a stage job pays it on every start. If
    inductor is loaded already, or torch has moved the private setter, the public call is made."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


class _OnImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` once a top-level module has been imported (by anyone, at any point of the stage), then
    steps aside: the import itself is left to the usual finders."""

    def __init__(self, name: str, then: Callable[[Any], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute, then = spec.loader.exec_module, self.then

        def exec_module(module: Any) -> None:
            execute(module)
            then(module)

        spec.loader.exec_module = exec_module  # this spec's own loader object: nothing else is patched
        return spec


def _placement() -> str:
    """Where a cluster put this job (SLURM job id, partition, GPUs), for the log; empty outside a cluster."""
    parts = [f"{key}={os.environ[key]}" for key in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "CUDA_VISIBLE_DEVICES")
             if key in os.environ]
    return f" ({', '.join(parts)})" if parts else ""


def quiet_hub() -> None:
    """Everything the stages load is local; never let a library reach for the network."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def as_int_keys(mapping: dict[Any, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in mapping.items()}

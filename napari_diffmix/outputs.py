"""Where a command may write: never over its own inputs, and ``--overwrite`` only over outputs
this tool made.

Every writing command calls :func:`refuse_overlap` with its inputs and :func:`check_replace`
with the kinds of output it may replace, before it reads or renders anything. Folders are
recognised as ours by what they hold: a synthetic store by its ``zarr.json`` format, a
segmentation model by its ``config.json`` format, a diffusion training run by its config and
checkpoints, anything else (exports, label-map folders, predictions, the demo data) by the
marker file :data:`MARKER` that :func:`write_marker` puts in it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Collection, Iterable

from .errors import OutputError, OutputLockedError, UnsafeOutputError

MARKER = ".napari-diffmix-output.json"
MARKER_FORMAT = "napari-diffmix-output"
# A synthetic store's ``format`` attribute (defined here, where every output kind is
# recognised, so that this module needs no import of the store's).
STORE_FORMAT = "napari-diffmix-synthetic"

# What each kind is called in messages.
KINDS = {
    "store": "a synthetic store",
    "export-hovernet": "a HoVer-Net export",
    "export-pannuke": "a PanNuke export",
    "labels": "a 'diffmix labels' output",
    "demo-data": "the demo dataset ('diffmix demo-data')",
    "dataset": "a dataset folder written by napari-diffmix",
    "predict": "a 'diffmix predict' output",
    "compare": "a 'diffmix compare' folder",
    "seg-model": "a segmentation model folder",
    "train-run": "a diffusion training run folder",
}


def write_marker(folder: str | os.PathLike, kind: str, **details: Any) -> None:
    """Mark ``folder`` (usually the temporary folder of an atomic write) as ``kind`` output."""
    from . import __version__
    from .atomic import write_json

    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)}")
    write_json(Path(folder) / MARKER, {"format": MARKER_FORMAT, "kind": kind, "napari_diffmix": __version__, **details})


def _json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of napari-diffmix output ``path`` holds (a key of :data:`KINDS`), None for anything else."""
    path = Path(path)
    if not path.is_dir():
        return None
    marker = _json(path / MARKER)
    if marker is not None and marker.get("format") == MARKER_FORMAT and marker.get("kind") in KINDS:
        return marker["kind"]
    zarr_json = _json(path / "zarr.json")
    if zarr_json is not None:
        attrs = zarr_json.get("attributes")
        return "store" if isinstance(attrs, dict) and attrs.get("format") == STORE_FORMAT else None
    config = _json(path / "config.json")
    if config is not None:
        if str(config.get("format", "")).startswith("napari-diffmix-seg/"):
            return "seg-model"
        if {"model_config", "scheme"} <= config.keys() and ((path / "checkpoints").is_dir() or (path / "log.csv").is_file()):
            return "train-run"
    return None


def _describe(kind: str | None) -> str:
    return KINDS.get(kind, "napari-diffmix output") if kind else "not written by napari-diffmix"


def check_replace(out: str | os.PathLike, overwrite: bool, kinds: Collection[str], *, flag: str = "--out") -> bool:
    """Refuse an existing ``out`` that would be replaced without ``overwrite``, or that is not
    one of ``kinds`` (our own outputs: ``--overwrite`` never replaces anything else).

    A missing ``out`` or an empty folder is always fine. Returns whether something will be
    replaced. Only the refusal that ``overwrite`` would lift names ``--overwrite``.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir():
        raise UnsafeOutputError(f"{out}: exists and is a file, not a folder; choose a new or empty folder for {flag}")
    if not any(out.iterdir()):
        return False
    kind = output_kind(out)
    if kind is None:
        raise UnsafeOutputError(
            f"{out}: exists, is not empty and is not a napari-diffmix output; nothing there is replaced: "
            f"choose a new or empty folder for {flag}"
        )
    if kind not in kinds:
        wanted = " or ".join(KINDS[k] for k in kinds)
        raise UnsafeOutputError(f"{out}: holds {KINDS[kind]}, not {wanted}; choose a new or empty folder for {flag}")
    if not overwrite:
        raise UnsafeOutputError(f"{out}: output exists and is not empty ({KINDS[kind]}); pass --overwrite to replace it, or choose another {flag}")
    return True


def refuse_overlap(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, flag: str = "--out") -> None:
    """Refuse an ``out`` that is one of ``inputs``, lies inside one or holds one: writing there
    would replace or pollute the data the command reads. Inputs that do not exist on disk
    (None, ``"demo"``) are skipped."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if target == src:
            why = "is the input"
        elif target in src.parents:
            why = "holds the input"
        elif src in target.parents:
            why = "lies inside the input"
        else:
            continue
        raise UnsafeOutputError(
            f"{flag} {os.fspath(out)} {why} {os.fspath(given)}; write outside every input (nothing was written)"
        )


class WriterLock:
    """One writing process at a time for ``target`` (a store, a run folder).

    The lock is an exclusive ``flock`` on a file beside the target (``.NAME.lock``; inside it,
    replacing the target with --overwrite would drop it), holding the writer's host, pid and
    command for the message another writer gets. The kernel releases the lock when its
    process dies, SIGKILL included, so a crashed run never leaves a lock that blocks a resume;
    the file left behind by such a run is taken over. Re-entrant within one process is not
    needed and not supported.
    """

    def __init__(self, target: str | os.PathLike, what: str = "store"):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        import fcntl
        import socket
        import sys
        import time

        for _ in range(10):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(self.path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _json(self.path) or {}
                os.close(fd)
                who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "since") if k in holder) or "unknown process"
                command = f" ({holder['command']})" if holder.get("command") else ""
                raise OutputLockedError(
                    f"{self.target}: another process is writing this {self.what}: {who}{command}; wait for it to end or "
                    f"stop it, or choose another --out (two writers would mix their items)"
                ) from None
            except OSError as exc:  # e.g. ENOLCK: the file system has no locks; go on unguarded, but say so
                os.close(fd)
                import logging

                logging.getLogger(__name__).warning("%s: cannot lock (%s); make sure no other process writes it", self.target, exc)
                return self
            # The holder before us may have removed the file between our open and our lock:
            # then we locked a file nobody else sees. Try again on the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            self._fd = fd
            return self
        raise OutputLockedError(f"{self.target}: could not take the writer lock {self.path} (it keeps changing)")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Removed while still held, so nobody can lock the old file and think it is current.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

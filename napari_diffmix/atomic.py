"""Atomic writes: a file or folder appears whole under its final name or not at all.

Everything that writes user data goes through these helpers so that a crash, Ctrl-C or a
full disk never leaves a half-written file under a name that readers trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import OutputError


def _umask() -> int:
    # Read without changing it: os.umask can only be read by setting it (racy across threads).
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _publish_mode(path: Path, mode: int) -> None:
    # mkstemp/mkdtemp create private (0600/0700) temporaries; the final output gets the
    # permissions any other file the user creates would get.
    os.chmod(path, mode & ~_umask())


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is flushed; not all platforms allow it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Errors of the writer itself, not of reading inputs: only these become an OutputError when
# they come from the body of an atomic write.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _write_failure(exc: BaseException, path: Path) -> OutputError | None:
    """The OutputError a failed write into ``path``'s temporary amounts to, None for other errors.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos ...`` and safetensors as ``SafetensorError: ... (os error 28)``: neither is an
    OSError, so the user saw an internal message instead of the path and the reason.
    """
    if isinstance(exc, OutputError):
        return None
    if isinstance(exc, OSError):
        return OutputError(path, exc) if exc.errno in _WRITE_ERRNOS else None
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", text)
        if found:
            code = int(found.group(1))
            return OutputError(path, OSError(code, os.strerror(code)))
        return None
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        if _free_bytes(path.parent) < _LOW_SPACE:
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        else:
            cause = OSError(errno.EIO, "the write stopped short (a full disk, a quota or a file size limit)")
        return OutputError(path, cause)
    return None


_LOW_SPACE = 64 * 2**20


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


@contextlib.contextmanager
def _written_by_caller(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        failure = _write_failure(exc, path)
        if failure is None:
            raise
        raise failure from exc


@contextlib.contextmanager
def _output_errors(path: Path) -> Iterator[None]:
    # Creating or replacing the output is where a file in the way, a missing permission or a
    # full disk shows up; the user needs the path, not a traceback from tempfile.
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(path, exc) from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic.
    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    with _output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _written_by_caller(path):
            yield tmp
        with _output_errors(path):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            _publish_mode(tmp, 0o666)
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; move it onto ``path`` on success.

    An existing ``path`` is replaced only after the new directory is complete.
    """
    path = Path(path)
    with _output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _written_by_caller(path):
            yield tmp
        with _output_errors(path):
            _publish_mode(tmp, 0o777)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths (the values our records hold)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """An RGB/grey uint8 image as a PNG file."""
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")

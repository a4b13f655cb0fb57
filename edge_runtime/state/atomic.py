"""Crash-safe writes: every file and checkpoint directory the runtime keeps goes through here.

A file is written to a temporary sibling (same folder, so the rename cannot cross file
systems), flushed and fsynced, renamed over the target with ``os.replace``, and then the folder
is fsynced so that the rename itself survives a power cut. A reader sees the old file or the
new one, never a prefix of either.

A directory cannot be renamed over a non-empty one, so :func:`replace_directory` builds the new
directory beside the target, fsyncs everything in it, moves the old one to a fixed *aside* name
(:func:`aside_path`), renames the new one in and only then deletes the aside copy. If the process
dies between the two renames, the target is missing and the aside copy is the last complete
one; readers fall back to it (``load_checkpoint`` does, with a warning) and the next write
completes the swap. One writer per target is assumed (the runtime's serving thread).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# mkstemp creates 0600 files; the runtime's outputs are ordinary data files.
DEFAULT_MODE = 0o644


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder, making renames and deletions inside it durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; nothing more can be done there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file that was written (and closed) by code that does not do it itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int = DEFAULT_MODE) -> Iterator[Path]:
    """Yield a temporary sibling path for writers that want a file name (ONNX, safetensors);
    when the block succeeds it is fsynced and renamed onto ``path``, else removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # a no-op once renamed
    fsync_dir(target.parent)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *, mode: int = DEFAULT_MODE
) -> Path:
    """Replace ``path`` with what ``write(fh)`` writes to a binary file object, atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, mode: int = DEFAULT_MODE
) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), mode=mode)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", mode: int = DEFAULT_MODE
) -> Path:
    return atomic_write_bytes(path, text.encode(encoding), mode=mode)


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 2,
    default: Callable[[Any], Any] | None = None,
    allow_nan: bool = True,
    mode: int = DEFAULT_MODE,
) -> Path:
    """``obj`` as JSON (one trailing newline), atomically. Serialised before the file is
    opened, so an unserialisable object leaves the old file untouched."""
    text = json.dumps(obj, indent=indent, default=default, allow_nan=allow_nan) + "\n"
    return atomic_write_text(path, text, mode=mode)


def aside_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`replace_directory` keeps the previous ``path`` while it swaps."""
    target = Path(path)
    return target.parent / f".{target.name}.old"


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def replace_directory(path: str | os.PathLike[str], build: Callable[[Path], Any]) -> Path:
    """Replace the directory ``path`` with one that ``build(tmp_dir)`` fills, crash-safely.

    At every instant either ``path`` or :func:`aside_path` holds a complete directory (the new
    one or the old one). A failure inside ``build`` leaves ``path`` untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = aside_path(target)
    prefix = f".{target.name}.tmp-"
    for stale in target.parent.iterdir():
        if stale.name.startswith(prefix):  # a build that a crash cut short
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        build(tmp)
        _fsync_tree(tmp)
        if target.exists():
            # ``target`` only ever appears by a rename of a complete, fsynced directory, so an
            # aside copy left beside it by an interrupted swap is older and can go.
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(target, aside)
            fsync_dir(target.parent)
        # With no ``target``, an existing aside copy is the only complete one: it stays until
        # the new directory is in place.
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not target.exists():
            with contextlib.suppress(OSError):
                os.replace(aside, target)  # put the old one back where readers look first
        raise
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(target.parent)
    return target

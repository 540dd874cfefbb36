"""The one atomic writer: every file headpolicy writes goes through here.

    atomic_write(path, text_or_bytes)          # a policy, a JSON report, a kernel source
    atomic_write(path, writer=fig.savefig)     # anything that writes to a binary file object
    with atomic_directory(out) as tmp: ...     # a folder that appears whole (an ONNX export)
    settings_data(settings)                    # a settings dataclass as result files record it

What "atomic" means here:
- the data goes to a *unique* temporary file in the target's own folder (two writers to one
  path never share a temporary name), is flushed and fsynced, then renamed over the target,
  so a reader sees the old file or the new one, never half of one, and a crash leaves the
  old file in place;
- the new file gets the mode an ordinary `open(path, "w")` would give it: 0o666 less the
  umask (mkstemp's 0o600 would make a policy attached to a shared checkpoint unreadable to
  other users);
- a symlink at `path` is written *through*: its target is replaced and the link stays;
- on any error the temporary file is removed and the error is re-raised as `OutputError`
  naming the path (the target is untouched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from headpolicy.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_target(path: str | os.PathLike) -> Path:
    """The file a write to `path` replaces: the final target of a symlink, else `path` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; give a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: {path.parent} is not a directory")


def atomic_write(
    path: str | os.PathLike, data: str | bytes | None = None, *, writer: Callable[[IO[bytes]], Any] | None = None
) -> Path:
    """Write `data` (str as UTF-8, or bytes) or whatever `writer(binary_file)` writes to `path`, atomically.

    Creates missing parent folders. Returns the path written (a symlink's target for a symlink).
    Raises OutputError, naming the path, when the folder cannot be written.
    """
    if (data is None) == (writer is None):
        raise TypeError("atomic_write takes exactly one of data= and writer=")
    path = resolve_target(path)
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if writer is not None:
                writer(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`data` as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(data, indent=1) + "\n")


def settings_data(settings: Any) -> dict:
    """A settings dataclass as result files record it (tuples as lists): what `--full-from`
    compares and what a policy's provenance keeps."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a fresh temporary folder beside `path`; on success it replaces `path` whole.

    A folder that is already at `path` is replaced only after the new one is complete.
    """
    path = resolve_target(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write folder {path}: a file is in the way")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write folder {path}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            _replace_folder(path, tmp)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write folder {path}: {e.strerror or e}") from None
        raise


def _replace_folder(path: Path, new: Path) -> None:
    """Swap folder `new` in for the folder at `path`; on failure the old folder is back at `path`
    (or, if even that fails, kept in a `.NAME.old.*` folder beside it: never deleted)."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    try:
        os.replace(path, old / path.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old / path.name, path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)

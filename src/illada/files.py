"""Small file helpers shared by every writer: atomic replacement (never a partial file) and strict JSON reading."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from illada.errors import IlladaError


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file so that readers see either the old file or the complete new one, never a partial file."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # a unique name in the same directory (so os.replace is a rename); open() honours the umask, unlike mkstemp
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold an object; any problem is one IlladaError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IlladaError(f"{path}: cannot read JSON ({error})") from error
    if not isinstance(data, dict):
        raise IlladaError(f"{path}: expected a JSON object")
    return data

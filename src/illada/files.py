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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses what strict JSON lacks: NaN, Infinity, -Infinity (Python's json accepts them, and
    they then break every integer or range check downstream). Raises ValueError (JSONDecodeError is one)."""
    return json.loads(text, parse_constant=_no_constant)


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold an object; any problem (unreadable, not UTF-8, not strict JSON, too deeply
    nested, not an object) is one IlladaError naming the file."""
    path = Path(path)
    try:
        data = loads_strict(path.read_bytes().decode("utf-8"))
    except OSError as error:
        reason = error.strerror or str(error)
    except UnicodeDecodeError as error:
        reason = f"not UTF-8 text at byte {error.start}"
    except ValueError as error:  # JSONDecodeError, NaN/Infinity
        reason = str(error)
    except RecursionError:
        reason = "nested too deeply"
    else:
        reason = None
    if reason is not None:
        raise IlladaError(f"{path}: cannot read JSON ({reason})")
    if not isinstance(data, dict):
        raise IlladaError(f"{path}: expected a JSON object")
    return data


def check_unicode(text: str, what: str = "text") -> str:
    """`text` if it can be written as UTF-8; a lone surrogate (from a non-UTF-8 argv or stdin decoded with
    surrogateescape, or a JSON "\\ud800" escape) is an IlladaError naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise IlladaError(f"{what} is not valid Unicode text (U+{ord(text[error.start]):04X} at character "
                          f"{error.start}: a byte that is not UTF-8, or a lone surrogate)") from None
    return text


def _writable(directory: Path) -> str | None:
    """Why `directory` (or, when it does not exist yet, its nearest existing ancestor) cannot receive files."""
    probe = directory
    while not probe.exists():
        if probe.is_symlink():
            return f"{probe} is a broken symbolic link"
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def check_output_dir(path: str | Path, option: str) -> Path:
    """Fail early, with one line naming `option`, when `path` cannot become a writable directory. Nothing is
    created: a command that fails later must not leave an empty output behind."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise IlladaError(f"{option} {path}: exists and is not a directory")
    problem = _writable(path)
    if problem:
        raise IlladaError(f"{option} {path}: cannot write there ({problem})")
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """Like check_output_dir for a file: its directory must be writable (or creatable) and it not a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IlladaError(f"{option} {path}: is a directory")
    problem = _writable(path.parent)
    if problem:
        raise IlladaError(f"{option} {path}: cannot write there ({problem})")
    return path


def read_stdin_text() -> str:
    """All of stdin as UTF-8 text (whatever the locale's encoding); bytes that are not UTF-8 are an IlladaError."""
    import sys

    stream = getattr(sys.stdin, "buffer", None)
    try:
        if stream is None:  # replaced by a text stream (tests, embedding): it decodes itself
            return check_unicode(sys.stdin.read(), "stdin")
        return stream.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise IlladaError(f"stdin is not UTF-8 text (byte {error.start})") from None


def stdin_lines():
    """Lines of stdin as they arrive (for interactive use), each checked to be UTF-8 text."""
    import sys

    number = 0
    while True:
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            raise IlladaError(f"stdin line {number + 1} is not UTF-8 text") from None
        if not line:
            return
        number += 1
        yield check_unicode(line, f"stdin line {number}")

"""Run untrusted generated Python (HumanEval-style tests) in a separate, limited process — never in ours.

Layers, each a fallback for the one before:
- a fresh network namespace (`unshare --map-root-user --net`, when the kernel allows unprivileged user
  namespaces): no interface but loopback, so no packet can leave;
- inside the child, before the program runs, an audit hook refuses to create non-Unix sockets, resolve names,
  connect, or start processes (a second barrier where unshare is unavailable);
- resource limits: address space, CPU seconds, file size, open files; a wall-clock timeout that kills the whole
  process group; a temporary working directory deleted afterwards; a minimal environment; isolated mode (-I).
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs in the child: limits and the network/process guard first, then the program as __main__.
_GUARD = r'''
import resource, runpy, socket, sys

def _limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))

_limit(resource.RLIMIT_AS, {memory_bytes})
_limit(resource.RLIMIT_CPU, {cpu_seconds})
_limit(resource.RLIMIT_FSIZE, {file_bytes})
_limit(resource.RLIMIT_NOFILE, 256)

_BLOCKED = {{"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
            "socket.sendto", "socket.sendmsg", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
            "os.spawn", "os.fork", "os.forkpty", "pty.spawn"}}

def _guard(event, args):
    if event in _BLOCKED or (event == "socket.__new__" and args[1] != socket.AF_UNIX):
        raise PermissionError("sandbox: " + event + " is not allowed (no network, no processes)")

if {block}:
    sys.addaudithook(_guard)
del _limit, _guard
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass
class SandboxResult:
    """Outcome of one program: status is "passed" (exit 0), "failed" (non-zero exit), or "timeout"."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolated_network: bool  # True when the child ran in its own network namespace

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command prefix if this machine lets us make a network namespace, else ()."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    prefix = (unshare, "--map-root-user", "--net")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if probe.returncode == 0 else ()


def _clip(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + f"\n... [{len(text) - limit} more characters]"


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, allow_network: bool = False,
               output_limit: int = 4000) -> SandboxResult:
    """Run `program` (Python source) in a sandboxed child process with a `timeout` in seconds (wall clock; CPU
    time is capped at the same, rounded up) and an address-space limit of `memory_mb`."""
    workdir = tempfile.mkdtemp(prefix="illada-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(workdir, "guard.py"), "w", encoding="utf-8") as f:
            f.write(_GUARD.format(memory_bytes=memory_mb * 2**20, cpu_seconds=int(timeout) + 1,
                                  file_bytes=64 * 2**20, block=not allow_network))
        prefix = () if allow_network else network_namespace_prefix()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        command = [*prefix, sys.executable, "-I", "guard.py", "program.py"]
        began = time.perf_counter()
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the program may have left children
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            status = "timeout"
        seconds = time.perf_counter() - began
        if status == "failed" and proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and seconds >= timeout:
            status = "timeout"
        return SandboxResult(status=status, returncode=proc.returncode, stdout=_clip(out, output_limit),
                             stderr=_clip(err, output_limit), seconds=seconds, isolated_network=bool(prefix))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

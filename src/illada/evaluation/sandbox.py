"""Run untrusted model-written Python (HumanEval tests, code rewards) isolated by bubblewrap, never in our process.

What the program sees (`bwrap`): a fresh root holding only read-only system directories (`/usr`, `/lib*`, `/bin`)
and the Python install, a private size-capped tmpfs as its working directory and `/tmp`, its own PID, network,
IPC and UTS namespaces (no network interface but a down loopback, no host Unix socket, no host process to signal),
a cleared environment, a new session (no terminal), and an unprivileged uid (nobody). Before the program runs, the
guard sets rlimits on CPU seconds, address space, file size, open files and processes. From outside, a wall-clock
timeout SIGKILLs bwrap, and `--die-with-parent` takes the whole PID namespace with it; output goes to files, so no
leftover child can hold a pipe open.

Run as root, bwrap builds the namespaces with privilege (no user namespace) keeping only CAP_SETUID/CAP_SETGID, and
the guard switches to uid/gid 65534 before anything else; the process limit then counts that uid. Run as another
user, bwrap maps the program to uid 65534 in a new user namespace (the kernel counts processes per namespace).

Without a working bubblewrap, `run_python` refuses (`SandboxUnavailable`) unless the caller passes
`allow_unsandboxed=True` (`--allow-unsandboxed-code`); then only the rlimits, the timeout, a minimal environment and
an audit hook that refuses sockets and process creation stand in the way, which determined code can get around.
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

from illada.errors import IlladaError

NOBODY = 65534
UNSAFE_FLAG = "--allow-unsandboxed-code"

# Runs first in the child: privilege drop (root mode), limits, the optional audit hook, then the program as __main__.
_GUARD = r'''
import os, resource, runpy, socket, sys

if {drop_to} >= 0:
    os.setgroups([])
    os.setresgid({drop_to}, {drop_to}, {drop_to})
    os.setresuid({drop_to}, {drop_to}, {drop_to})

def _limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))

_limit(resource.RLIMIT_AS, {memory_bytes})
_limit(resource.RLIMIT_CPU, {cpu_seconds})
_limit(resource.RLIMIT_FSIZE, {file_bytes})
_limit(resource.RLIMIT_NOFILE, 256)
_limit(resource.RLIMIT_NPROC, {max_processes})
_limit(resource.RLIMIT_CORE, 0)

_BLOCKED = {{"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
            "socket.sendto", "socket.sendmsg", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
            "os.spawn", "os.fork", "os.forkpty", "pty.spawn"}}

def _guard(event, args):
    if event in _BLOCKED or (event == "socket.__new__" and args[1] != socket.AF_UNIX):
        raise PermissionError("sandbox: " + event + " is not allowed (no network, no processes)")

if {audit_hook}:
    sys.addaudithook(_guard)
del _limit, _guard
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


class SandboxUnavailable(IlladaError):
    """No isolation for generated code on this machine, and the caller did not opt in to running it without."""


@dataclass
class SandboxResult:
    """Outcome of one program: status is "passed" (exit 0), "failed" (non-zero exit), or "timeout"."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str  # "bubblewrap" or "none" (the explicit unsafe opt-in)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Bubblewrap:
    path: str
    privileged: bool    # run as root: no user namespace, the guard drops to nobody
    size_option: bool   # this bwrap caps the tmpfs (--size, bubblewrap >= 0.8)


def _python() -> tuple[str, list[str]]:
    """The interpreter to run inside (the base install, not a venv wrapper) and the directories it needs."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    roots = {os.path.realpath(sys.base_prefix), os.path.dirname(exe)}
    return exe, sorted(r for r in roots if not r.startswith("/usr/") and r != "/usr")


def _bwrap_command(bw: _Bubblewrap, inner: list[str], bind_dir: str, *, share_net: bool,
                   tmpfs_bytes: int) -> list[str]:
    cmd = [bw.path, "--die-with-parent", "--new-session", "--clearenv",
           "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if not share_net:
        cmd.append("--unshare-net")
    if bw.privileged:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d"):
        cmd += ["--ro-bind-try", etc, etc]
    for root in _python()[1]:
        parents = []
        parent = os.path.dirname(root)
        while parent not in ("/", ""):
            parents.insert(0, parent)
            parent = os.path.dirname(parent)
        for parent in parents:  # bwrap would make them 0700, closed to nobody
            cmd += ["--perms", "0755", "--dir", parent]
        cmd += ["--ro-bind", root, root]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    for tmp in ("/tmp", "/work"):
        if bw.size_option:
            cmd += ["--size", str(tmpfs_bytes)]
        cmd += ["--perms", "1777", "--tmpfs", tmp]
    cmd += ["--ro-bind", bind_dir, "/sandbox", "--chdir", "/work"]
    for key, value in _ENV.items():
        cmd += ["--setenv", key, value]
    return cmd + ["--", *inner]


_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


@functools.lru_cache(maxsize=1)
def bubblewrap() -> _Bubblewrap | str:
    """The working bubblewrap set-up on this machine, or why there is none (probed once per process)."""
    path = shutil.which("bwrap")
    if path is None:
        return "bubblewrap (`bwrap`) is not installed (Debian/Ubuntu: apt install bubblewrap)"
    exe = _python()[0]
    modes = [True, False] if os.geteuid() == 0 else [False]
    last = ""
    with tempfile.TemporaryDirectory(prefix="illada-probe-") as probe_dir:
        os.chmod(probe_dir, 0o755)
        for privileged in modes:
            for size_option in (True, False):
                bw = _Bubblewrap(path, privileged, size_option)
                inner = [exe, "-I", "-c", "import os; os.setresuid(65534, 65534, 65534)" if privileged else "pass"]
                try:
                    probe = subprocess.run(_bwrap_command(bw, inner, probe_dir, share_net=False, tmpfs_bytes=2**20),
                                           capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
                except (OSError, subprocess.SubprocessError) as error:
                    last = str(error)
                    continue
                if probe.returncode == 0:
                    return bw
                last = probe.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {probe.returncode}"]
                last = last[0]
    return f"bubblewrap cannot create a sandbox here ({last})"


def require_isolation(allow_unsandboxed: bool = False) -> str:
    """"bubblewrap" when generated code can be isolated; "none" if not but the caller opted in; else raises."""
    found = bubblewrap()
    if isinstance(found, _Bubblewrap):
        return "bubblewrap"
    if allow_unsandboxed:
        return "none"
    raise SandboxUnavailable(f"refusing to run model-written code without isolation: {found}; {UNSAFE_FLAG} runs "
                             "it with only resource limits and a timeout (UNSAFE: it can read and change your files)")


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(4 * limit + 4)
    text = data.decode("utf-8", errors="replace")
    more = os.path.getsize(path) - len(data)
    if len(text) <= limit and more <= 0:
        return text
    return text[:limit] + "\n... [output cut]"


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 16,
               file_mb: int = 64, allow_network: bool = False, allow_unsandboxed: bool = False,
               output_limit: int = 4000) -> SandboxResult:
    """Run `program` (Python source) isolated, with a wall-clock `timeout` in seconds (CPU time capped at the same,
    rounded up), `memory_mb` of address space, `max_processes` processes, `file_mb` per file and of scratch space.

    Raises `SandboxUnavailable` when there is no isolation and `allow_unsandboxed` is False."""
    isolation = require_isolation(allow_unsandboxed)
    bw = bubblewrap() if isolation == "bubblewrap" else None
    workdir = tempfile.mkdtemp(prefix="illada-sandbox-")
    try:
        src, out_dir = os.path.join(workdir, "src"), os.path.join(workdir, "out")
        os.mkdir(src)
        os.mkdir(out_dir)
        os.chmod(workdir, 0o755)
        os.chmod(src, 0o755)  # readable by the sandbox's nobody; out/ stays ours (0700)
        drop_to = NOBODY if bw is not None and bw.privileged else -1
        guard = _GUARD.format(drop_to=drop_to, memory_bytes=memory_mb * 2**20, cpu_seconds=int(timeout) + 1,
                              file_bytes=file_mb * 2**20, max_processes=max_processes,
                              audit_hook=bw is None and not allow_network)
        for name, text in (("guard.py", guard), ("program.py", program)):
            with open(os.path.join(src, name), "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(os.path.join(src, name), 0o644)
        exe = _python()[0]
        if bw is not None:
            command = _bwrap_command(bw, [exe, "-I", "/sandbox/guard.py", "/sandbox/program.py"], src,
                                     share_net=allow_network, tmpfs_bytes=file_mb * 2**20)
            env, cwd = {}, "/"
        else:
            scratch = os.path.join(workdir, "work")
            os.mkdir(scratch)
            command = [exe, "-I", os.path.join(src, "guard.py"), os.path.join(src, "program.py")]
            env, cwd = {**_ENV, "HOME": scratch, "TMPDIR": scratch}, scratch
        out_path, err_path = os.path.join(out_dir, "stdout"), os.path.join(out_dir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            began = time.perf_counter()
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                status = "passed" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                status = "timeout"
            # the group: bwrap (its death takes the PID namespace), or the unsandboxed program and its children
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            seconds = time.perf_counter() - began
        if status == "failed" and proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU,
                                                      128 + signal.SIGKILL) and seconds >= timeout:
            status = "timeout"
        return SandboxResult(status=status, returncode=proc.returncode, stdout=_read(out_path, output_limit),
                             stderr=_read(err_path, output_limit), seconds=seconds, isolation=isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

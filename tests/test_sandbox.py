"""The code sandbox under attack: every escape seen against the old sandbox is tried by a test program and must fail.

Each attack is also aimed at something the test can observe from outside (a marker file on the host, a host file
that must survive, a host socket, this process, the host process table), so a passing test cannot be a broken
program. The tests need bubblewrap; CI installs it and sets ILLADA_REQUIRE_SANDBOX=1, which turns a skip into a failure.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from illada.evaluation import sandbox
from illada.evaluation.sandbox import SandboxUnavailable, run_python


@pytest.fixture(autouse=True)
def needs_bubblewrap(request):
    if not request.node.get_closest_marker("no_bwrap_needed"):
        request.getfixturevalue("sandbox_available")


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_normal_program_runs_as_nobody_in_a_private_scratch_dir():
    result = run_python("import os\nopen('x.txt', 'w').write('hi')\nprint(os.getuid(), os.getcwd(), "
                        "open('x.txt').read())\n")
    assert result.passed and result.isolation == "bubblewrap"
    assert result.stdout.split() == ["65534", "/work", "hi"]
    failed = run_python("assert 1 + 1 == 3\n")
    assert failed.status == "failed" and "AssertionError" in failed.stderr


def test_files_outside_cannot_be_written_or_deleted(tmp_path):
    victim, victim_dir = tmp_path / "victim.txt", tmp_path / "victim_dir"
    victim.write_text("keep me")
    victim_dir.mkdir()
    (victim_dir / "inner").write_text("keep me too")
    marker = tmp_path / "marker"
    program = f"""
import os, shutil
for attempt in (lambda: open({str(marker)!r}, "w").write("pwned"),
                lambda: os.remove({str(victim)!r}),
                lambda: shutil.rmtree({str(victim_dir)!r}),
                lambda: open("/usr/illada-marker", "w"),
                lambda: open(os.path.expanduser("~/../marker"), "w")):
    try:
        attempt()
        print("ESCAPED")
    except OSError:
        pass
"""
    result = run_python(program)
    assert result.passed and "ESCAPED" not in result.stdout
    assert victim.read_text() == "keep me" and (victim_dir / "inner").read_text() == "keep me too"
    assert not marker.exists() and not os.path.exists("/usr/illada-marker")


def test_host_secrets_and_system_files_cannot_be_read(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-FILE")
    monkeypatch.setenv("ILLADA_TEST_SECRET", "TOPSECRET-ENV")
    program = f"""
import os
seen = [repr(dict(os.environ))]
for path in ({str(secret)!r}, "/etc/passwd", "/etc/shadow", "/proc/1/environ", "/proc/{os.getpid()}/environ",
             "/proc/{os.getppid()}/environ", {os.path.expanduser("~/.bash_history")!r}):
    try:
        seen.append(open(path, "rb").read().decode("latin-1"))
    except OSError:
        seen.append("-")
print(os.listdir("/root") if os.path.isdir("/root") else [])
print("|".join(seen))
"""
    result = run_python(program)
    assert result.passed, result.stderr
    assert "TOPSECRET" not in result.stdout and "root:x:" not in result.stdout
    host_root = set(os.listdir("/root")) if os.access("/root", os.R_OK) else set()
    listed = eval(result.stdout.splitlines()[0])  # a list literal printed by the program
    assert set(listed) <= {".pyenv", ".local"} and (not host_root or set(listed) < host_root | {".pyenv"})


def test_started_processes_cannot_touch_the_host(tmp_path):
    marker = tmp_path / "marker"
    program = f"""
import ctypes, _posixsubprocess, os, subprocess
cmd = "echo pwned > {marker}"
for attempt in (lambda: ctypes.CDLL(None).system(cmd.encode()),
                lambda: subprocess.run(["/bin/sh", "-c", cmd]),
                lambda: os.system(cmd)):
    try:
        attempt()
    except Exception as error:
        print("refused:", error)
print("done")
"""
    result = run_python(program)
    assert "done" in result.stdout and not marker.exists()


def test_a_fork_bomb_is_capped_and_nothing_outlives_the_call():
    tag = f"illada-bomb-{uuid.uuid4().hex}"
    program = f"""
import os, subprocess, sys, time
children = 0
try:
    for _ in range(10000):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "{tag}"])
        children += 1
except OSError as error:
    print("capped at", children, type(error).__name__, flush=True)
time.sleep(60)
"""
    began = time.perf_counter()
    result = run_python(program, timeout=2.0, max_processes=16)
    assert result.status == "timeout" and time.perf_counter() - began < 3.0
    assert "capped at" in result.stdout and int(result.stdout.split()[2]) < 16
    time.sleep(0.2)
    assert host_processes_with(tag) == []


def test_the_evaluator_and_host_processes_cannot_be_signalled():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        program = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}, {bystander.pid}):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as error:
        print(pid, type(error).__name__)
"""
        run_python(program)
        time.sleep(0.2)
        assert bystander.poll() is None  # still running; and so are we
    finally:
        bystander.kill()
        bystander.wait()


def test_a_setsid_grandchild_neither_holds_the_call_nor_survives_it():
    tag = f"illada-orphan-{uuid.uuid4().hex}"
    program = f"""
import os, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(60)", "{tag}"],
                 start_new_session=True, stdout=sys.stdout, stderr=sys.stderr)
print("parent exits")
"""
    began = time.perf_counter()
    result = run_python(program, timeout=5.0)
    assert result.passed and time.perf_counter() - began < 2.0
    time.sleep(0.2)
    assert host_processes_with(tag) == []
    # one that never exits, in a program that never exits: the timeout holds to within a second
    forever = program.replace('print("parent exits")', "import time\nwhile True: time.sleep(1)")
    began = time.perf_counter()
    result = run_python(forever, timeout=1.0)
    assert result.status == "timeout" and time.perf_counter() - began < 2.0
    time.sleep(0.2)
    assert host_processes_with(tag) == []


def test_a_cpu_loop_and_a_memory_grab_are_stopped():
    began = time.perf_counter()
    assert run_python("while True:\n    pass\n", timeout=1.0).status == "timeout"
    assert time.perf_counter() - began < 2.0
    big = run_python("x = bytearray(1 << 31)\n", memory_mb=256)
    assert big.status == "failed" and "MemoryError" in big.stderr
    disk = run_python("open('big', 'wb').write(b'a' * (80 << 20))\n", file_mb=16)
    assert disk.status == "failed" and "File too large" in disk.stderr


@pytest.fixture
def listener():
    """A TCP server on this machine's loopback that answers every connection."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(10)

    def serve():
        try:
            for _ in range(4):
                conn, _ = server.accept()
                conn.sendall(b"hello")
                conn.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


CONNECT = """
import socket
import subprocess
s = socket.create_connection(("127.0.0.1", {port}), timeout=3)
assert s.recv(5) == b"hello"
print("CONNECTED")
"""


def test_no_connection_to_host_services(listener, tmp_path):
    program = CONNECT.format(port=listener)
    # The same program connects when the network is shared: the test can tell blocked from broken.
    assert "CONNECTED" in run_python(program, allow_network=True).stdout
    result = run_python(program)
    assert result.status == "failed" and "CONNECTED" not in result.stdout

    path, abstract = str(tmp_path / "host.sock"), f"\0illada-{uuid.uuid4().hex}"
    servers = []
    for address in (path, abstract):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(1)
        servers.append(server)
    program = f"""
import socket
import subprocess
for address in ({path!r}, {abstract!r}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(address)
        print("CONNECTED", repr(address))
    except OSError as error:
        print("refused", type(error).__name__)
"""
    try:
        result = run_python(program)
    finally:
        for server in servers:
            server.close()
    assert result.passed and "CONNECTED" not in result.stdout and result.stdout.count("refused") == 2


@pytest.mark.no_bwrap_needed
def test_without_isolation_generated_code_is_refused_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "bubblewrap", lambda: "bubblewrap (`bwrap`) is not installed")
    with pytest.raises(SandboxUnavailable, match="refusing to run model-written code.*--allow-unsandboxed-code"):
        run_python("print('hi')\n")
    unsafe = run_python("print('hi')\n", allow_unsandboxed=True)
    assert unsafe.passed and unsafe.isolation == "none" and unsafe.stdout == "hi\n"
    # the unsafe mode still has its guard: no sockets, no processes, limits and the timeout
    spawn = run_python("import subprocess\nsubprocess.run(['true'])\n", allow_unsandboxed=True)
    assert spawn.status == "failed" and "not allowed" in spawn.stderr
    began = time.perf_counter()
    assert run_python("while True: pass\n", timeout=1.0, allow_unsandboxed=True).status == "timeout"
    assert time.perf_counter() - began < 2.0


@pytest.mark.no_bwrap_needed
def test_eval_humaneval_without_isolation_is_one_line_and_runs_nothing(monkeypatch, tmp_path, capsys):
    import json

    import illada.__main__ as cli

    monkeypatch.setattr(sandbox, "bubblewrap", lambda: "bubblewrap (`bwrap`) is not installed")
    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps({"task_id": "t/0", "prompt": "def f():\n", "test": "assert True",
                                "entry_point": "f"}) + "\n")
    loaded = []
    monkeypatch.setattr("illada.load", lambda *a, **k: loaded.append(a))
    code = cli.main(["eval", "--model", str(tmp_path / "none"), "--task", "humaneval", "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and loaded == [] and "Traceback" not in err
    assert "refusing to run model-written code" in err and "--allow-unsandboxed-code" in err
    assert len(err.strip().splitlines()) == 1

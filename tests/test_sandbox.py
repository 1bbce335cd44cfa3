"""The code sandbox against hostile programs: each must be contained, reported as a failure, and harmless."""

from __future__ import annotations

import os
import socket
import sys
import threading

import pytest

from moelm.eval.sandbox import SandboxLimits, run_program, run_programs

LINUX_ROOT = sys.platform.startswith("linux") and os.geteuid() == 0
FAST = SandboxLimits(timeout_s=5, cpu_s=3, memory_bytes=512 << 20, max_processes=16, output_bytes=32 << 10)


def test_ordinary_program_passes_and_failing_asserts_fail():
    ok = run_program("assert sum(range(5)) == 10\nprint('done')", FAST)
    assert ok.passed and ok.stdout == "done\n" and ok.returncode == 0
    bad = run_program("assert 1 == 2", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_is_stopped():
    result = run_program("while True:\n    pass", SandboxLimits(timeout_s=4, cpu_s=2))
    assert not result.passed and result.wall_s < 4.5


def test_sleeping_program_hits_the_wall_clock_timeout():
    result = run_program("import time\ntime.sleep(60)", SandboxLimits(timeout_s=1))
    assert result.status == "timeout" and result.wall_s < 3


def test_memory_bomb_is_contained():
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))", FAST)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_printing_gigabytes_is_cut_off():
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", FAST)
    assert result.status == "output_limit" and len(result.stdout) == FAST.output_bytes and result.wall_s < 3


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("MOELM_TEST_SECRET", "s3cret-value")
    program = (
        "import os\n"
        "assert 'MOELM_TEST_SECRET' not in os.environ\n"
        "try:\n"
        "    leaked = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
        "except OSError:\n"
        "    leaked = b''\n"
        "print('LEAK' if b's3cret-value' in leaked else 'clean')\n"
    )
    result = run_program(program, FAST)
    assert result.passed and "clean" in result.stdout


def test_work_directory_is_fresh_and_removed():
    program = "import os\nprint(os.getcwd())\nprint(os.listdir('.'))\nopen('out.txt', 'w').write('x')"
    first = run_program(program, FAST)
    assert first.passed
    workdir = first.stdout.splitlines()[0]
    assert first.stdout.splitlines()[1] == "['main.py']"
    assert not os.path.exists(workdir)


@pytest.mark.skipif(not LINUX_ROOT, reason="uid drop and private mounts need root on Linux (what CI runs as)")
def test_writing_and_deleting_outside_the_work_dir_fails(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    tmp_path.chmod(0o777)  # even a world-writable host directory stays out of reach
    program = (
        "import os, sys\n"
        f"paths = [{str(precious)!r}, '/etc/moelm-sandbox-test', {str(tmp_path / 'new.txt')!r}]\n"
        "harm = []\n"
        "for path in paths:\n"
        "    try:\n"
        "        os.remove(path) if path.endswith('precious.txt') else open(path, 'w').write('x')\n"
        "        harm.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "open('/tmp/scratch.txt', 'w').write('private tmp only')\n"
        "if harm:\n    sys.exit(1)\n"
    )
    result = run_program(program, FAST)
    assert result.passed, result.stderr  # it ran to its end: every harmful operation was refused
    assert precious.read_text() == "keep me"
    assert not os.path.exists("/etc/moelm-sandbox-test") and not (tmp_path / "new.txt").exists()
    assert not os.path.exists("/tmp/scratch.txt")


@pytest.mark.skipif(not LINUX_ROOT, reason="a network namespace is created as root on Linux")
def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')"
    result = run_program(program, FAST)
    server.close()
    assert result.status == "failed" and "CONNECTED" not in result.stdout and not accepted
    assert "no_network" in result.enforced


@pytest.mark.skipif(not LINUX_ROOT, reason="the caller is protected by the uid drop, done as root")
def test_killing_the_parent_fails():
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)"
    result = run_program(program, FAST)
    assert result.status == "failed" and "PermissionError" in result.stderr


@pytest.mark.skipif(not LINUX_ROOT, reason="RLIMIT_NPROC only binds a dedicated non-root uid")
def test_fork_bomb_is_contained_after_a_harmless_probe():
    probe = (
        "import os, time\n"
        "children = 0\n"
        "for _ in range(40):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(5)\n"
        "        os._exit(0)\n"
        "    children += 1\n"
        "print(children)\n"
    )
    probed = run_program(probe, FAST)
    assert probed.passed and int(probed.stdout) < FAST.max_processes, "process limit not in force: no bomb"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_program(bomb, SandboxLimits(timeout_s=3, cpu_s=2, max_processes=16))
    assert not result.passed
    after = run_program("print('still fine')", FAST, slot=0)  # the same uid slot works again: nothing left over
    assert after.passed and after.stdout == "still fine\n"


def test_pool_keeps_order_and_isolates_samples():
    programs = ["print(1)", "while True: pass", "import sys; sys.exit(3)", "print(4)"]
    results = run_programs(programs, SandboxLimits(timeout_s=3, cpu_s=2), workers=2)
    assert [r.status for r in results][0] == "passed" and results[3].stdout == "4\n"
    assert not results[1].passed and results[2].returncode == 3


# A wrong solution to a HumanEval-shaped problem, each time with a trick that would make it "pass" if success
# meant exit status 0: every one must fail, because success means the program ran to its last line.
PROBLEM = {
    "prompt": "def add(a, b):\n",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(5, 5) == 10\n",
    "entry_point": "add",
}
WRONG = "    return a - b\n"
EXPLOITS = {
    "raise SystemExit": "raise SystemExit(0)\n",
    "sys.exit": "import sys\nsys.exit(0)\n",
    "os._exit": "import os\nos._exit(0)\n",
    "exit()": "exit()\n",
    "quit()": "quit(0)\n",
    "exit inside the function": None,  # replaced below: the exit runs when check calls the candidate
    "fake marker": "print('0123456789abcdef0123456789abcdef')\nimport os\nos._exit(0)\n",
    "marker read from the environment": "import os\nprint(os.environ.get('MOELM_NONCE', ''))\nos._exit(0)\n",
    "own check, monkeypatched": "import builtins\nbuiltins.check = lambda candidate: None\ncheck = builtins.check\n",
    "exit at interpreter shutdown": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "excepthook": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
}


@pytest.mark.parametrize("name", list(EXPLOITS))
def test_a_program_that_does_not_run_to_its_end_fails(name):
    from moelm.eval.code import humaneval_program

    if name == "exit inside the function":
        completion = "    import sys\n    sys.exit(0)\n"
    else:
        completion = WRONG + EXPLOITS[name]
    result = run_program(humaneval_program(PROBLEM, completion))
    assert not result.passed, (name, result)
    assert result.status in ("failed", "exited_early")


def test_deleting_the_test_function_fails():
    """The tests and the call to check come after the completion; a program whose test code is cut (so the
    completion's own check runs) still has to reach its end, and a wrong candidate does not."""
    from moelm.eval.code import humaneval_program

    shadow = WRONG + "\ndef check(candidate):\n    pass\n"
    assert not run_program(humaneval_program(PROBLEM, shadow)).passed
    assert run_program(humaneval_program(PROBLEM, "    return a + b\n")).passed
    assert run_program(humaneval_program(PROBLEM, "    return a + b\n")).stdout == ""  # the nonce is not shown

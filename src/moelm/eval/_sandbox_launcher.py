"""Sandbox launcher: runs as its own process (no threads), confines itself, then execs the untrusted program.

Started by `moelm.eval.sandbox` as `python -I _sandbox_launcher.py CONFIG_JSON`. Steps, each recorded in
`enforced.json` beside the work directory so the caller can report what held on this machine:
1. new network namespace (no interfaces up: no network) and mount namespace with private, size-limited tmpfs
   over /tmp, /var/tmp and /dev/shm (writes outside the work directory vanish with the process);
2. resource limits: CPU seconds, address space, processes, file size, open files, no core dumps;
3. as root: drop to a dedicated unprivileged uid/gid (RLIMIT_NPROC is per uid and ignored for root, and an
   unprivileged uid cannot write the host's files, signal the caller or read its /proc environ);
4. exec the interpreter on a small runner with a scrubbed environment; the runner executes the program and then
   prints a per-run nonce, so the caller can tell a program that ran to its end from one that exited early.
This file must not import moelm: it runs as a plain script under `python -I`.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18


def _private_mounts(libc, enforced, workdir):
    """Private tmpfs over the shared temporary directories; the work directory is bound back into place."""
    keep = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return
    mounted = []
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            flags = MS_NOSUID | MS_NODEV
            if libc.mount(b"tmpfs", path.encode(), b"tmpfs", flags, b"size=16m,mode=1777") == 0:
                mounted.append(path)
    if mounted:
        enforced.append("private_tmp:" + ",".join(mounted))
    if not os.path.isdir(workdir):  # it lived under a directory just replaced: bind the original back
        os.makedirs(workdir)
        if libc.mount(f"/proc/self/fd/{keep}".encode(), workdir.encode(), None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), "cannot bind the work directory into the sandbox")
    os.close(keep)
    os.chdir(workdir)


def _namespaces(enforced, is_root, workdir):
    libc = ctypes.CDLL(None, use_errno=True)
    if is_root:
        if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) == 0:
            enforced.append("no_network")
            _private_mounts(libc, enforced, workdir)
        elif libc.unshare(CLONE_NEWNET) == 0:
            enforced.append("no_network")
        return
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS) != 0:
        return
    enforced.append("no_network")
    try:  # map ourselves to root inside the namespace so tmpfs can be mounted there
        with open("/proc/self/setgroups", "w") as handle:
            handle.write("deny")
        with open("/proc/self/uid_map", "w") as handle:
            handle.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as handle:
            handle.write(f"0 {gid} 1")
        _private_mounts(libc, enforced, workdir)
    except OSError:
        pass


def _limits(config, enforced):
    limits = [
        (resource.RLIMIT_CPU, config["cpu_s"], "cpu"),
        (resource.RLIMIT_AS, config["memory_bytes"], "memory"),
        (resource.RLIMIT_FSIZE, config["file_bytes"], "file_size"),
        (resource.RLIMIT_NOFILE, 64, "open_files"),
        (resource.RLIMIT_CORE, 0, "core"),
        (resource.RLIMIT_NPROC, config["max_processes"], "processes"),
    ]
    for kind, value, name in limits:
        try:
            resource.setrlimit(kind, (value, value))
            enforced.append(name)
        except (ValueError, OSError):
            pass


# Runs the program as __main__ and prints the nonce only when the program's code ran to its end: an early
# sys.exit / SystemExit, os._exit, a signal or an exception all end the process before the nonce is written.
RUNNER = """
import os, runpy, sys
def run():
    fd, program = int(sys.argv[1]), sys.argv[2]
    token = os.read(fd, 256)
    os.close(fd)
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")
    sys.stdout.flush()
    os.write(1, b"\\n" + token + b"\\n")
run()
"""


def main():
    config = json.loads(sys.argv[1])
    enforced = []
    is_root = os.geteuid() == 0
    report = open(config["report"], "w")  # noqa: SIM115 - opened before the mounts hide its directory
    os.chdir(config["workdir"])  # likewise: the cwd stays reachable after /tmp is replaced
    _namespaces(enforced, is_root, config["workdir"])
    _limits(config, enforced)
    if is_root:
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
        enforced.append(f"uid:{config['uid']}")
    if "processes" in enforced and not is_root:
        enforced.append("processes_shared_with_caller_uid")
    json.dump(enforced, report)
    report.close()
    nonce = os.read(config["nonce_fd"], 256)  # read before every inherited descriptor is closed
    os.closerange(3, 1 << 16)
    # The nonce reaches the runner through a fresh pipe that the runner drains before the program starts, so it
    # is in neither the program text, its argv nor its environment.
    read_end, write_end = os.pipe()
    os.write(write_end, nonce)
    os.close(write_end)
    os.set_inheritable(read_end, True)
    env = config["env"]
    program = config["program"]
    argv = [config["interpreter"], "-I", "-B", "-c", RUNNER, str(read_end), program]
    os.execve(config["interpreter"], argv, env)


if __name__ == "__main__":
    main()

"""Run untrusted code (model output, build.rs, proc macros, tests) in a bubblewrap sandbox.

Builds on bubblewrap (`bwrap`, Debian package `bubblewrap`) for namespaces and mounts, util-linux's
`prlimit` for rlimits and `setpriv` for dropping to an unprivileged uid. Own code for the rest: the
layout, the uid pool, bounded output capture and the wall-clock kill are small and need exact behaviour.

What the sandboxed process sees
- no network: `--unshare-net` leaves only a loopback device of its own (the host's 127.0.0.1 is not it);
- a fresh PID namespace (`--unshare-pid`), IPC and UTS namespaces, `--die-with-parent`, `--new-session`;
- read-only: /usr (and the /bin, /lib* links or dirs), a handful of /etc files (passwd, group, hosts,
  ld.so cache, alternatives -- the `cc` linker lives behind /etc/alternatives), the Rust toolchain's
  sysroot at /opt/rust, the offline crate registry;
- writable: the task workspace at /workspace, an optional shared target dir at /target (so repeated
  builds of one task are incremental), a size-capped tmpfs at /tmp (HOME=/tmp/home, so nothing a
  build writes to $HOME ends up in the workspace and in the agent's diff) and a tmpfs CARGO_HOME holding
  the source-replacement config (crates-io -> directory source, `--offline`);
- minimal /proc (own PID namespace) and /dev (null, zero, random, tty, ...). Nothing else of the host.

Limits, and what works as root and as non-root
- rlimits (set by `prlimit` inside the sandbox, just before the program runs): CPU seconds, address space,
  file size, no core dumps, and RLIMIT_NPROC (tasks = processes + threads).
- RLIMIT_NPROC is counted per *real* user and is never enforced for uid 0 (the kernel exempts
  INIT_USER), and a user namespace of root still maps to uid 0. So:
  * as root (CI, the device machine): bwrap runs privileged without a user namespace and the program is
    started through `setpriv` under a dedicated uid taken from a pool (`uid_base` .. `uid_base+uid_count`,
    one per concurrent sandbox, held by a file lock), with every capability dropped and no_new_privs.
    The workspace and target dir are chowned to that uid first (lchown: a symlink planted by an earlier
    run never redirects the chown). NPROC then bites and concurrent sandboxes don't share the budget.
  * as non-root: bwrap creates a user namespace (`--unshare-user --disable-userns`). On Linux >= 5.14
    rlimit counts are kept per user namespace, so the NPROC cap counts only this sandbox's tasks (older
    kernels count all of the user's processes: raise `nproc` there).
- wall clock: the whole process group is SIGKILLed at `timeout_s`; killing bwrap ends the PID namespace,
  which takes every descendant with it (even ones that called setsid).
- stdout/stderr are read incrementally; each keeps its first and last `output_limit_bytes // 2` bytes.
- not capped: disk use of the workspace (no quotas; FSIZE bounds single files), host CPU share.

If bubblewrap cannot run (missing, or namespaces denied), `Sandbox.run` raises SandboxUnavailable with
the reason, unless `allow_unsandboxed` (CLI `--unsafe-no-sandbox`): then the program runs directly on the
host with rlimits only (NPROC does not bite as root) and a loud warning is logged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rustforge.config import SandboxConfig

log = logging.getLogger(__name__)

SANDBOX_WORKSPACE = "/workspace"
SANDBOX_TARGET = "/target"
SANDBOX_TOOLCHAIN = "/opt/rust"
SANDBOX_REGISTRY = "/opt/cargo-registry"
SANDBOX_CARGO_HOME = "/cargo-home"
SANDBOX_HOME = "/tmp/home"
CARGO_SUBCOMMANDS = ("check", "test", "build", "clippy")

# /etc entries a toolchain needs; nothing secret (no shadow, no ssh, no credentials).
_ETC_FILES = (
    "passwd", "group", "hosts", "nsswitch.conf", "host.conf", "ld.so.cache", "ld.so.conf",
    "ld.so.conf.d", "alternatives", "localtime", "os-release",
)  # fmt: skip
# Kept by root's bwrap until setpriv runs: switch uid/gid, clear the bounding set, and search the
# workspace (owned by the sandbox uid) to chdir into it.
_SETPRIV_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_READ_SEARCH")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here; the message says why and how to proceed."""


# SandboxConfig lives in rustforge.config with every other default.



@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    killed_by_signal: int | None
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# ------------------------------------------------------------------------------------ output capture
class _BoundedCapture:
    """Keeps the first and last `limit // 2` bytes of a stream, counting what falls in between."""

    def __init__(self, limit: int):
        self.head_limit = limit - limit // 2
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_limit = limit // 2
        self.tail_size = 0
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        self.tail.append(chunk)
        self.tail_size += len(chunk)
        while self.tail and self.tail_size - len(self.tail[0]) >= self.tail_limit:
            self.dropped += len(self.tail[0])
            self.tail_size -= len(self.tail.popleft())

    def text(self) -> tuple[str, bool]:
        tail = b"".join(self.tail)
        cut = max(0, len(tail) - self.tail_limit)
        dropped = self.dropped + cut
        tail = tail[cut:]
        head = self.head.decode("utf-8", errors="replace")
        if not dropped:
            return head + tail.decode("utf-8", errors="replace"), False
        marker = f"\n[... {dropped} bytes of output truncated ...]\n"
        return head + marker + tail.decode("utf-8", errors="replace"), True


def _drain(stream, capture: _BoundedCapture) -> None:
    try:
        while chunk := stream.read1(65536):
            capture.feed(chunk)
    except (OSError, ValueError):  # closed under us after a kill
        pass


def _feed_stdin(stream, data: bytes) -> None:
    try:
        stream.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------ host discovery
@cache
def find_toolchain_sysroot() -> Path | None:
    """Sysroot of the host's Rust toolchain (rustup's ~/.cargo/bin is searched too), or None."""
    search = os.environ.get("PATH", "")
    home = os.path.expanduser("~")
    if home != "~":  # an unknown uid has no home
        search += os.pathsep + os.path.join(home, ".cargo", "bin")
    rustc = shutil.which("rustc", path=search)
    if rustc is None:
        return None
    try:  # cwd=/ so that no rust-toolchain file of some directory picks the toolchain
        out = subprocess.run(
            [rustc, "--print", "sysroot"], capture_output=True, text=True, cwd="/", timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sysroot = Path(out.stdout.strip())
    return sysroot if out.returncode == 0 and (sysroot / "bin" / "cargo").is_file() else None


@cache
def _bwrap_features(bwrap: str) -> frozenset[str]:
    try:
        help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(opt for opt in ("--size", "--disable-userns", "--perms") if opt in help_text)


def _is_root() -> bool:
    return os.geteuid() == 0


def _mapped_uid_ranges() -> list[tuple[int, int]]:
    """(first, count) uid ranges usable in this user namespace (all of them outside containers)."""
    try:
        rows = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return [(0, 2**32 - 1)]
    return [(int(rows[i]), int(rows[i + 2])) for i in range(0, len(rows), 3)]


# ---------------------------------------------------------------------------------------- uid pool
class _UidLease:
    """An exclusive uid from the pool, held by flock on a per-uid lock file (works across processes)."""

    def __init__(self, cfg: SandboxConfig, preferred: int | None):
        self.uid = -1
        self._fd = -1
        lock_dir = Path(tempfile.gettempdir()) / f"rustforge-sandbox-uids-{os.geteuid()}"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        pool = range(cfg.uid_base, cfg.uid_base + cfg.uid_count)
        order = ([preferred] if preferred in pool else []) + list(pool)
        deadline = time.monotonic() + max(60.0, cfg.timeout_s)
        while time.monotonic() < deadline:
            for uid in order:
                fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.uid, self._fd = uid, fd
                return
            time.sleep(0.05)
        raise SandboxUnavailable(f"all {cfg.uid_count} sandbox uids from {cfg.uid_base} are busy")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def _chown_tree(root: Path, uid: int) -> None:
    """lchown every entry under root (never follows symlinks, never leaves root)."""
    os.chown(root, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


# ------------------------------------------------------------------------------------------ sandbox
def cargo_config_toml(registry: str, jobs: int = 0) -> str:
    """CARGO_HOME/config.toml: crates.io replaced by a local directory source, network off."""
    text = (
        '[source.crates-io]\nreplace-with = "debian"\n\n'
        f'[source.debian]\ndirectory = "{registry}"\n\n'
        "[net]\noffline = true\n\n"
        '[term]\ncolor = "never"\n'
    )
    if jobs > 0:
        text += f"\n[build]\njobs = {jobs}\n"
    return text


class Sandbox:
    """Runs commands in a bubblewrap sandbox (see module docstring). Thread-safe: one per process is enough."""

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self._unsafe_home: Path | None = None
        self._probe_lock = threading.Lock()
        self._probe_error: str | None | bool = False  # False = not probed yet
        self._warned = False

    # -------------------------------------------------------------------------------- availability
    def unavailable_reason(self) -> str | None:
        """None when bubblewrap works here, else a sentence saying why not (probed once, cached)."""
        with self._probe_lock:
            if self._probe_error is False:
                self._probe_error = self._probe()
            return self._probe_error  # type: ignore[return-value]

    def _probe(self) -> str | None:
        bwrap = shutil.which(self.cfg.bwrap)
        if bwrap is None:
            return f"bubblewrap ({self.cfg.bwrap!r}) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        helpers = ["prlimit"] + (["setpriv"] if _is_root() else [])
        for tool in helpers:
            if not Path("/usr/bin", tool).is_file():
                return f"/usr/bin/{tool} is missing (Debian package util-linux)"
        if _is_root():
            last = self.cfg.uid_base + self.cfg.uid_count - 1
            if not any(a <= self.cfg.uid_base and last < a + n for a, n in _mapped_uid_ranges()):
                return f"uids {self.cfg.uid_base}..{last} (sandbox uid_base/uid_count) are not mapped here"
        argv = [bwrap, *self._namespace_args(), "--ro-bind", "/usr", "/usr", *self._usr_links(), "--proc",
                "/proc", "--dev", "/dev", "--"]  # fmt: skip
        if _is_root():  # the uid switch must work too (a container may not map the pool's uids)
            uid = str(self.cfg.uid_base)
            argv += ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        argv.append("/usr/bin/true")
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bubblewrap failed to start: {e}"
        if out.returncode != 0:
            return f"bubblewrap cannot create namespaces here (user namespaces denied?): {out.stderr.strip()}"
        return None

    def _check_available(self) -> bool:
        """True: use bwrap. False: run unsandboxed (allowed and warned). Raises otherwise."""
        reason = self.unavailable_reason()
        if reason is None:
            return True
        if not self.cfg.allow_unsandboxed:
            raise SandboxUnavailable(
                f"{reason}. Untrusted code is only run sandboxed; pass --unsafe-no-sandbox "
                "(SandboxConfig.allow_unsandboxed) to run it with rlimits only."
            )
        if self._warned:
            return False
        self._warned = True
        log.warning(
            "!!! SANDBOX DISABLED: %s. Running untrusted code directly on this host with rlimits only "
            "(--unsafe-no-sandbox): it can read your files and use the network. !!!",
            reason,
        )
        return False

    # -------------------------------------------------------------------------------------- running
    def run(
        self,
        argv: list[str],
        workspace: Path,
        target_dir: Path | None = None,
        env: dict[str, str] | None = None,
        stdin: str | bytes | None = None,
    ) -> RunResult:
        """Run argv with cwd = the workspace (/workspace inside), under the limits of self.cfg."""
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        workspace = _checked_dir(workspace, "workspace")
        if target_dir is not None:
            Path(target_dir).mkdir(parents=True, exist_ok=True)
            target_dir = _checked_dir(target_dir, "target_dir")
        for name in env or {}:
            if not _ENV_NAME.match(name):
                raise ValueError(f"env: invalid variable name {name!r}")
        data = stdin.encode() if isinstance(stdin, str) else stdin
        if not self._check_available():
            return self._run_unsandboxed(argv, workspace, target_dir, env or {}, data)
        lease = None
        try:
            if _is_root():
                # reusing the uid that owns the target dir spares chowning a large tree
                lease = _UidLease(self.cfg, preferred=(target_dir or workspace).stat().st_uid)
                _chown_tree(workspace, lease.uid)
                if target_dir is not None and target_dir.stat().st_uid != lease.uid:
                    _chown_tree(target_dir, lease.uid)
            return self._run_bwrap(argv, workspace, target_dir, env or {}, data, lease.uid if lease else None)
        finally:
            if lease is not None:
                lease.release()

    def cargo(
        self,
        workspace: Path,
        subcommand: str,
        extra_args: list[str] | tuple[str, ...] = (),
        target_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> RunResult:
        """`cargo <subcommand> --offline <extra_args>` in the sandbox (check, test, build or clippy)."""
        if subcommand not in CARGO_SUBCOMMANDS:
            raise ValueError(f"cargo subcommand must be one of {CARGO_SUBCOMMANDS}, got {subcommand!r}")
        if find_toolchain_sysroot() is None:
            raise SandboxUnavailable("no Rust toolchain found (rustc not on PATH nor in ~/.cargo/bin)")
        argv = ["cargo", subcommand, "--offline"]
        if self.cfg.cargo_jobs > 0 and subcommand != "clippy":
            argv += ["-j", str(self.cfg.cargo_jobs)]
        return self.run(argv + list(extra_args), workspace, target_dir, env)

    def has_tool(self, name: str) -> bool:
        """Whether the toolchain ships `name` (e.g. "cargo-clippy")."""
        sysroot = find_toolchain_sysroot()
        return sysroot is not None and (sysroot / "bin" / name).is_file()

    # ------------------------------------------------------------------------------------ internals
    def _namespace_args(self) -> list[str]:
        args = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session"]  # fmt: skip
        if _is_root():  # privileged bwrap keeps only what setpriv needs; setpriv then drops every capability
            args += ["--cap-drop", "ALL"]
            for cap in _SETPRIV_CAPS:
                args += ["--cap-add", cap]
        else:
            args += ["--unshare-user"]
            if "--disable-userns" in _bwrap_features(self.cfg.bwrap):
                args += ["--disable-userns"]
        return args

    @staticmethod
    def _usr_links() -> list[str]:
        """/bin, /lib* as on the host: symlinks into /usr on merged-/usr systems, else read-only binds."""
        args = []
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/", name)
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        return args

    @staticmethod
    def _sandbox_env(target_dir: Path | None) -> dict[str, str]:
        env = {
            "PATH": f"{SANDBOX_TOOLCHAIN}/bin:/usr/local/bin:/usr/bin:/bin",
            "HOME": SANDBOX_HOME,
            "USER": "sandbox",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "CARGO_HOME": SANDBOX_CARGO_HOME,
            "CARGO_TERM_COLOR": "never",
            "CARGO_NET_OFFLINE": "true",
        }
        if target_dir is not None:
            env["CARGO_TARGET_DIR"] = SANDBOX_TARGET
        return env

    def _limit_argv(self) -> list[str]:
        c = self.cfg
        mb = 1024 * 1024
        return ["/usr/bin/prlimit", f"--cpu={c.cpu_s}:{c.cpu_s + 1}", f"--as={c.memory_mb * mb}",
                f"--nproc={c.nproc}", f"--fsize={c.fsize_mb * mb}", "--core=0", "--"]  # fmt: skip

    def _bwrap_argv(self, argv, workspace: Path, target_dir: Path | None, env, uid: int | None, cfg_fd: int):
        features = _bwrap_features(self.cfg.bwrap)
        sysroot = find_toolchain_sysroot()

        def perms(mode: str) -> list[str]:
            return ["--perms", mode] if "--perms" in features else []

        def size(mb: int) -> list[str]:
            return ["--size", str(mb * 1024 * 1024)] if "--size" in features else []

        args = [shutil.which(self.cfg.bwrap), *self._namespace_args(), "--clearenv"]
        args += ["--ro-bind", "/usr", "/usr", *self._usr_links(), *perms("0755"), "--dir", "/etc"]
        for name in _ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += [*perms("01777"), *size(self.cfg.tmpfs_mb), "--tmpfs", "/tmp"]
        args += [*perms("01777"), "--dir", SANDBOX_HOME, *perms("0755"), "--dir", "/opt"]
        if sysroot is not None:
            args += ["--ro-bind", str(sysroot), SANDBOX_TOOLCHAIN]
        if Path(self.cfg.registry).is_dir():
            args += ["--ro-bind", self.cfg.registry, SANDBOX_REGISTRY]
        args += [*perms("01777"), *size(64), "--tmpfs", SANDBOX_CARGO_HOME]
        args += [*perms("0644"), "--ro-bind-data", str(cfg_fd), f"{SANDBOX_CARGO_HOME}/config.toml"]
        args += ["--bind", str(workspace), SANDBOX_WORKSPACE]
        if target_dir is not None:
            args += ["--bind", str(target_dir), SANDBOX_TARGET]
        args += ["--chdir", SANDBOX_WORKSPACE]
        for key, value in {**self._sandbox_env(target_dir), **env}.items():
            args += ["--setenv", key, value]
        args += ["--", *self._limit_argv()]
        if uid is not None:
            args += ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                     "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]  # fmt: skip
        return args + list(argv)

    def _run_bwrap(self, argv, workspace, target_dir, env, stdin: bytes | None, uid: int | None) -> RunResult:
        read_fd, write_fd = os.pipe()
        try:
            config = cargo_config_toml(SANDBOX_REGISTRY, self.cfg.cargo_jobs).encode()
            os.write(write_fd, config)  # a few hundred bytes: fits the pipe buffer, no reader needed yet
            os.close(write_fd)
            write_fd = -1
            full = self._bwrap_argv(argv, workspace, target_dir, env, uid, read_fd)
            return self._execute(full, cwd=None, env={}, stdin=stdin, pass_fds=(read_fd,), sandboxed=True)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)

    def _run_unsandboxed(self, argv, workspace: Path, target_dir, env, stdin: bytes | None) -> RunResult:
        with self._probe_lock:
            if self._unsafe_home is None:
                home = Path(tempfile.mkdtemp(prefix="rustforge-unsafe-home-"))
                (home / "cargo").mkdir()
                config = cargo_config_toml(self.cfg.registry, self.cfg.cargo_jobs)
                (home / "cargo" / "config.toml").write_text(config)
                self._unsafe_home = home
        sysroot = find_toolchain_sysroot()
        path = (f"{sysroot}/bin:" if sysroot else "") + "/usr/local/bin:/usr/bin:/bin"
        host_env = {"PATH": path, "HOME": str(self._unsafe_home), "TMPDIR": tempfile.gettempdir(),
                    "LANG": "C.UTF-8", "CARGO_HOME": str(self._unsafe_home / "cargo"),
                    "CARGO_TERM_COLOR": "never", "CARGO_NET_OFFLINE": "true"}  # fmt: skip
        if target_dir is not None:
            host_env["CARGO_TARGET_DIR"] = str(target_dir)
        full = self._limit_argv() + list(argv)
        return self._execute(full, cwd=workspace, env={**host_env, **env}, stdin=stdin, pass_fds=(), sandboxed=False)

    def _execute(self, argv, cwd, env, stdin: bytes | None, pass_fds, sandboxed: bool) -> RunResult:
        limit = self.cfg.output_limit_bytes
        out, err = _BoundedCapture(limit), _BoundedCapture(limit)
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,  # own process group: the timeout kills all of it
        )
        threads = [
            threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
        ]
        if stdin is not None:
            threads.append(threading.Thread(target=_feed_stdin, args=(proc.stdin, stdin), daemon=True))
        for t in threads:
            t.start()
        timed_out = not _wait_unreaped(proc.pid, start + self.cfg.timeout_s)
        _kill_group(proc.pid)  # before reaping, so the group id can't have been reused; also ends strays
        proc.wait()
        for t in threads:
            t.join(timeout=5.0)  # a stray holding the pipe open must not hang us
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        wall = time.monotonic() - start
        stdout, cut_out = out.text()
        stderr, cut_err = err.text()
        return RunResult(
            returncode=proc.returncode,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            truncated=cut_out or cut_err,
            killed_by_signal=_signal_of(proc.returncode, sandboxed, timed_out),
            wall_s=wall,
        )


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until pid exits or the deadline passes, leaving it a zombie (its group id stays ours)."""
    pause = 0.002
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_of(returncode: int, sandboxed: bool, timed_out: bool) -> int | None:
    """Signal that ended the program. bwrap reports a child killed by signal N as exit code 128+N."""
    if timed_out:
        return int(signal.SIGKILL)
    if returncode < 0:
        return -returncode
    if sandboxed and 128 < returncode <= 128 + 64:
        return returncode - 128
    return None


def _checked_dir(path: Path | str, what: str) -> Path:
    resolved = Path(path).resolve()
    if not resolved.is_dir():
        raise ValueError(f"{what}: {path} is not a directory")
    if resolved == Path("/"):
        raise ValueError(f"{what}: refusing to expose / to the sandbox")
    return resolved

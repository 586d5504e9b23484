"""Hostile programs run in rustforge.rust.sandbox and stay contained; the host is checked afterwards.

Quick hostile programs are Python one-liners (/usr/bin/python3 inside the sandbox); Rust is compiled only
where it matters (a build.rs, an offline cargo test against the Debian registry), with one shared target
dir. No test sends traffic off this machine: the only non-loopback connect happens after the program has
checked, inside the sandbox, that its network namespace has no route at all.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rustforge.rust.sandbox import (
    RunResult,
    Sandbox,
    SandboxConfig,
    SandboxUnavailable,
    find_toolchain_sysroot,
)

PY = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[1]
REGISTRY = Path("/usr/share/cargo/registry")

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
needs_python = pytest.mark.skipif(not Path(PY).is_file(), reason=f"{PY} missing")
needs_rust = pytest.mark.skipif(find_toolchain_sysroot() is None, reason="no Rust toolchain")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="uid pool is used only as root")


def small_config(**overrides) -> SandboxConfig:
    # a uid pool of this module's own: the stray-process checks must not see sandboxes that other test
    # processes (pytest -n) or a running miner start in the default pool
    base = {"timeout_s": 20.0, "memory_mb": 1024, "nproc": 64, "fsize_mb": 16, "tmpfs_mb": 64,
            "output_limit_bytes": 64_000, "uid_base": 3_900_000, "uid_count": 64}  # fmt: skip
    return SandboxConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    sb = Sandbox(small_config())
    reason = sb.unavailable_reason()
    assert reason is None, f"bwrap is installed but unusable: {reason}"
    return sb


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-target")


@pytest.fixture
def host_listener():
    """A TCP server on the host's 127.0.0.1; yields (port, connections it accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    accepted: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except OSError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def py(sandbox: Sandbox, code: str, workspace: Path, **kw) -> RunResult:
    return sandbox.run([PY, "-c", code], workspace, **kw)


def sandbox_uid_processes(cfg: SandboxConfig) -> list[int]:
    """Host pids whose real uid lies in the sandbox uid pool."""
    pool = range(cfg.uid_base, cfg.uid_base + cfg.uid_count)
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next(line for line in status.read_text().splitlines() if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) in pool:
            pids.append(int(status.parent.name))
    return pids


# ------------------------------------------------------------------------------------------ basics
@needs_python
def test_runs_in_workspace_with_stdin_and_exit_code(sandbox, workspace):
    code = "import sys,os; open('made.txt','w').write(sys.stdin.read().upper()); print(os.getcwd()); sys.exit(3)"
    result = py(sandbox, code, workspace, stdin="hello")
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "/workspace"
    assert (workspace / "made.txt").read_text() == "HELLO"
    assert not result.timed_out and result.killed_by_signal is None


def test_bad_arguments_are_clear_errors(sandbox, workspace, tmp_path):
    with pytest.raises(ValueError, match="argv"):
        sandbox.run([], workspace)
    with pytest.raises(ValueError, match="workspace"):
        sandbox.run(["true"], tmp_path / "missing")
    with pytest.raises(ValueError, match="invalid variable name"):
        sandbox.run(["true"], workspace, env={"A B": "x"})
    with pytest.raises(ValueError, match="subcommand"):
        sandbox.cargo(workspace, "install")
    with pytest.raises(ValueError, match="SandboxConfig.memory_mb must be > 0"):
        SandboxConfig(memory_mb=0)


# ----------------------------------------------------------------------------------------- network
NETWORK_PROBE = r"""
import json, socket, sys
port = int(sys.argv[1])
out = {"interfaces": [name for _, name in socket.if_nameindex()]}
routes = open("/proc/net/route").read().splitlines()[1:] + open("/proc/net/ipv6_route").read().splitlines()
out["routes"] = [r for r in routes if " lo" not in r and not r.rstrip().endswith("lo")]
def attempt(addr):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(addr); return "connected"
    except OSError as e:
        return type(e).__name__ + ":" + str(e.errno)
    finally:
        s.close()
out["localhost"] = attempt(("127.0.0.1", port))
# Only with no route out at all (so nothing can leave), try TEST-NET-1 (RFC 5737, never routed).
out["outside"] = attempt(("192.0.2.1", 80)) if not out["routes"] else "skipped: a route exists"
print(json.dumps(out))
"""


@needs_python
def test_no_network_host_loopback_or_outside(sandbox, workspace, host_listener):
    port, accepted = host_listener
    result = sandbox.run([PY, "-c", NETWORK_PROBE, str(port)], workspace)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["interfaces"] == ["lo"]
    assert out["routes"] == []
    assert out["localhost"].startswith("ConnectionRefusedError")  # the sandbox's own lo, not the host's
    assert out["outside"].startswith("OSError:101")  # ENETUNREACH: refused before any packet exists
    time.sleep(0.2)
    assert accepted == []


# ------------------------------------------------------------------------------------- filesystem
@needs_python
def test_writes_outside_workspace_fail(sandbox, workspace, tmp_path):
    tag = uuid.uuid4().hex
    targets = [
        tmp_path / "outside" / f"{tag}",  # a host dir that is not bound
        REPO / f"pwned-{tag}",
        Path.home() / f"pwned-{tag}",
        Path(f"/tmp/pwned-{tag}"),  # the sandbox's /tmp is a private tmpfs
        Path(f"/usr/pwned-{tag}"),
        Path(f"/etc/pwned-{tag}"),
        Path(f"/pwned-{tag}"),
    ]
    (tmp_path / "outside").mkdir()
    code = (
        "import sys, os\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(p), exist_ok=True); open(p, 'w').write('x'); print('wrote', p)\n"
        "    except OSError as e:\n"
        "        print('denied', p, e.errno)\n"
    )
    result = sandbox.run([PY, "-c", code, *map(str, targets)], workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("denied") + result.stdout.count("wrote") == len(targets)
    assert f"wrote /tmp/pwned-{tag}" in result.stdout  # private tmpfs: allowed inside, invisible outside
    for target in targets:
        assert not target.exists(), f"{target} escaped the sandbox"


@needs_python
def test_secret_outside_is_unreadable(sandbox, workspace, tmp_path):
    secret = tmp_path / "secret.txt"
    token = uuid.uuid4().hex
    secret.write_text(token)
    paths = [str(secret), "/etc/shadow", "/root/.bash_history", "/proc/1/root" + str(secret)]
    code = (
        "import sys\n"
        "for p in sys.argv[1:]:\n"
        "    try: print(open(p).read())\n"
        "    except OSError as e: print('denied', p, e.errno)\n"
        "import os; print(sorted(os.listdir('/')))\n"
    )
    result = sandbox.run([PY, "-c", code, *paths], workspace)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
    assert result.stdout.count("denied") == len(paths)
    visible_root = set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))
    assert visible_root <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "proc", "dev",
                            "tmp", "opt", "cargo-home", "workspace", "target"}  # fmt: skip


@root_only
@needs_python
def test_planted_symlink_does_not_redirect_chown(sandbox, workspace, tmp_path):
    host_file = tmp_path / "host-owned"
    host_file.write_text("x")
    (workspace / "link").symlink_to(host_file)
    result = py(sandbox, "print('ok')", workspace)
    assert result.returncode == 0
    assert host_file.stat().st_uid == 0


@needs_python
def test_file_size_limit(workspace):
    sb = Sandbox(small_config(fsize_mb=1))
    code = "f = open('big', 'wb')\nfor _ in range(8): f.write(b'0' * (1 << 20))\n"
    result = py(sb, code, workspace)
    assert result.returncode != 0
    assert (workspace / "big").stat().st_size <= 1 << 20


# ------------------------------------------------------------------------------ processes and time
@needs_python
def test_fork_bomb_is_contained(workspace):
    cfg = small_config(timeout_s=3.0, nproc=32)
    bomb = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n"
    start = time.monotonic()
    result = Sandbox(cfg).run([PY, "-c", bomb], workspace)
    assert result.timed_out and result.killed_by_signal == 9
    assert time.monotonic() - start < cfg.timeout_s + 3
    time.sleep(0.3)  # let the kernel finish tearing down the PID namespace
    if os.geteuid() == 0:
        assert sandbox_uid_processes(cfg) == []
    assert subprocess.run(["true"], check=False).returncode == 0  # the host can still fork


@needs_python
def test_nproc_limit_bites(workspace):
    code = (
        "import os, time\nn = 0\n"
        "try:\n    while n < 200:\n        if os.fork() == 0: time.sleep(20); os._exit(0)\n        n += 1\n"
        "except OSError: pass\nprint(n)\n"
    )
    result = Sandbox(small_config(nproc=16)).run([PY, "-c", code], workspace)
    assert result.returncode == 0, result.stderr
    assert 5 <= int(result.stdout) < 16
    assert result.wall_s < 5  # the sleeping children died with the PID namespace, nobody waited for them


@needs_python
def test_memory_bomb_is_killed(workspace):
    code = "chunks = []\nwhile True: chunks.append(bytearray(64 << 20))\n"
    result = Sandbox(small_config(memory_mb=256)).run([PY, "-c", code], workspace)
    assert result.returncode != 0 and not result.timed_out
    assert "MemoryError" in result.stderr
    assert result.wall_s < 10


@needs_python
def test_infinite_loop_times_out_and_strays_die(workspace):
    cfg = small_config(timeout_s=1.5)
    # a detached grandchild (own session) that would outlive a plain process-group kill
    code = "import subprocess\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\nwhile True: pass\n"
    result = Sandbox(cfg).run([PY, "-c", code], workspace)
    assert result.timed_out and result.killed_by_signal == 9
    assert result.wall_s < cfg.timeout_s + 2
    time.sleep(0.3)
    if os.geteuid() == 0:
        assert sandbox_uid_processes(cfg) == []


@needs_python
def test_cpu_limit_kills_busy_loop(workspace):
    result = Sandbox(small_config(cpu_s=1, timeout_s=15)).run([PY, "-c", "while True: pass"], workspace)
    assert not result.timed_out
    assert result.killed_by_signal in (9, 24)  # SIGXCPU at the soft limit, SIGKILL at the hard one
    assert result.wall_s < 8


@needs_python
def test_huge_output_is_truncated(workspace):
    limit = 64_000
    code = "import sys\nsys.stdout.write('BEGIN' + 'x' * (20 << 20) + 'END')\nsys.stderr.write('e' * (20 << 20))\n"
    result = Sandbox(small_config(output_limit_bytes=limit)).run([PY, "-c", code], workspace)
    assert result.returncode == 0 and result.truncated
    assert len(result.stdout) < limit + 200 and len(result.stderr) < limit + 200
    assert result.stdout.startswith("BEGIN") and result.stdout.endswith("END")
    assert "bytes of output truncated" in result.stdout


@root_only
@needs_python
def test_concurrent_runs_get_distinct_uids(sandbox, tmp_path):
    spaces = [tmp_path / f"ws{i}" for i in range(3)]
    results: list[RunResult] = [None] * 3  # type: ignore[list-item]

    def go(i):
        spaces[i].mkdir()
        results[i] = py(sandbox, "import os, time; time.sleep(0.5); print(os.getuid())", spaces[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = {int(r.stdout) for r in results}
    assert len(uids) == 3 and all(u >= sandbox.cfg.uid_base for u in uids)


NON_ROOT_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
from rustforge.rust.sandbox import Sandbox, SandboxConfig
ws = Path(tempfile.mkdtemp())
sb = Sandbox(SandboxConfig(timeout_s=10, nproc=16, memory_mb=512))
fork = "import os, time\nn = 0\ntry:\n  while n < 100:\n    if os.fork() == 0: time.sleep(20); os._exit(0)\n    n += 1\nexcept OSError: pass\nprint(n)"
forks = sb.run(["/usr/bin/python3", "-c", fork], ws)
net = sb.run(["/usr/bin/python3", "-c", "import socket; print([n for _, n in socket.if_nameindex()])"], ws)
print(json.dumps({"reason": sb.unavailable_reason(), "forks": forks.stdout.strip(), "net": net.stdout.strip()}))
"""


@root_only
@needs_python
def test_non_root_mode_user_namespace(tmp_path):
    """The same module run by an unprivileged user takes the user-namespace path; NPROC still bites."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src"), "TMPDIR": str(tmp_path)}
    os.chmod(tmp_path, 0o777)
    cmd = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", PY, "-c", NON_ROOT_SCRIPT]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    if "Permission denied" in proc.stderr and "rustforge" in proc.stderr:
        pytest.skip("the source tree is not readable by an unprivileged user")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reason"] is None
    assert 5 <= int(out["forks"]) < 16
    assert out["net"] == "['lo']"


# ------------------------------------------------------------------------------------ unavailable
def test_missing_bwrap_raises_with_reason(workspace):
    sb = Sandbox(small_config(bwrap="/nonexistent/bwrap"))
    with pytest.raises(SandboxUnavailable, match="not installed.*--unsafe-no-sandbox"):
        sb.run(["true"], workspace)


def test_unsafe_fallback_warns_and_keeps_limits(workspace, caplog):
    sb = Sandbox(small_config(bwrap="/nonexistent/bwrap", allow_unsandboxed=True, timeout_s=1.5))
    with caplog.at_level(logging.WARNING, logger="rustforge.rust.sandbox"):
        result = sb.run(["sh", "-c", "ulimit -v; pwd"], workspace)
    assert "SANDBOX DISABLED" in caplog.text
    assert result.stdout.split() == [str(1024 * 1024), str(workspace.resolve())]
    slow = sb.run(["sh", "-c", "sleep 30 & sleep 30"], workspace)
    assert slow.timed_out and slow.wall_s < 4


# ------------------------------------------------------------------------------------------- cargo
def write_crate(root: Path, name: str, lib: str, deps: str = "", build_rs: str | None = None) -> Path:
    (root / "src").mkdir(parents=True, exist_ok=True)
    manifest = f'[package]\nname = "{name}"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n{deps}'
    (root / "Cargo.toml").write_text(manifest)
    (root / "src" / "lib.rs").write_text(lib)
    if build_rs is not None:
        (root / "build.rs").write_text(build_rs)
    return root


def debian_crate_versions(name: str) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in REGISTRY.glob(f"{name}-[0-9]*"))


@needs_rust
@pytest.mark.skipif(not debian_crate_versions("itoa"), reason="Debian itoa crate not in the registry")
def test_cargo_test_offline_with_debian_crate(sandbox, workspace, target_dir):
    itoa = debian_crate_versions("itoa")[-1]
    lib = (
        "pub fn render(n: u64) -> String { itoa::Buffer::new().format(n).to_string() }\n"
        '#[cfg(test)]\nmod tests {\n    #[test]\n    fn renders() { assert_eq!(super::render(42), "42"); }\n}\n'
    )
    write_crate(workspace, "uses_itoa", lib, deps=f'itoa = "={itoa}"\n')
    first = sandbox.cargo(workspace, "test", target_dir=target_dir)
    assert first.returncode == 0, first.stderr
    assert "test tests::renders ... ok" in first.stdout
    assert f"itoa v{itoa}" in first.stderr
    again = sandbox.cargo(workspace, "check", target_dir=target_dir)
    assert again.returncode == 0, again.stderr
    rerun = sandbox.cargo(workspace, "test", target_dir=target_dir)
    assert rerun.returncode == 0 and "Compiling" not in rerun.stderr  # incremental: nothing rebuilt
    assert not (workspace / "target").exists()  # artifacts went to the shared target dir


HOSTILE_BUILD_RS = r"""
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
fn main() {
    let mut escaped = Vec::new();
    for path in [%PATHS%] {
        if std::fs::write(path, "pwned").is_ok() { escaped.push(format!("wrote {path}")); }
    }
    let mut secret = String::new();
    if std::fs::File::open("%SECRET%").and_then(|mut f| f.read_to_string(&mut secret)).is_ok() {
        escaped.push(format!("read secret {secret}"));
    }
    let addr: SocketAddr = "127.0.0.1:%PORT%".parse().unwrap();
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() { escaped.push("connected".into()); }
    if escaped.is_empty() {
        println!("cargo:warning=build.rs contained");
    } else {
        panic!("build.rs escaped: {escaped:?}");
    }
}
"""


@needs_rust
def test_hostile_build_rs_is_contained(sandbox, workspace, target_dir, tmp_path, host_listener):
    port, accepted = host_listener
    tag = uuid.uuid4().hex
    secret = tmp_path / "secret"
    secret.write_text(tag)
    outside = [tmp_path / f"out-{tag}", REPO / f"pwned-{tag}", Path.home() / f"pwned-{tag}"]
    build_rs = (
        HOSTILE_BUILD_RS.replace("%PATHS%", ", ".join(f'"{p}"' for p in outside))
        .replace("%SECRET%", str(secret))
        .replace("%PORT%", str(port))
    )
    write_crate(workspace, "hostile", "pub fn f() {}\n", build_rs=build_rs)
    result = sandbox.cargo(workspace, "build", target_dir=target_dir)
    assert result.returncode == 0, result.stderr
    assert "build.rs contained" in result.stderr  # the script really ran
    for path in outside:
        assert not path.exists()
    assert accepted == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

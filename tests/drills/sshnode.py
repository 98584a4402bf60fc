"""A loopback "cloud node" for `ray up` with Ray's `local` provider: an unprivileged user
reached by SSH on 127.0.0.1, for the ray-up drill (`test_rayup_drill.py`).

What stands in for what on a real cluster:
- the VM image: user `qywxnode` with Python 3.11 and Ray (a venv on the machine's
  interpreter, read through a read-only bind mount: /root is not readable by others), a
  `sudo` limited to the two commands of cluster.yaml's setup, and a login environment
  with RAY_TMPDIR (this node's Ray files, apart from every other Ray on the machine);
- sshd: our own, `sshd -D -f <our config>` on a free loopback port with its own host key,
  accepting one throwaway client key, run and stopped by PID. Ray's SSH runner has no
  port option, so the rendered cluster file reaches it through `ssh_proxy_command`
  (`relay.py`, a TCP relay on the stdlib).

Why a separate, unprivileged user and not root@127.0.0.1: `ray up`/`ray down` run
`ray stop` on the node, which kills every Ray process it may signal. As `qywxnode` it may
signal only its own (the kernel refuses the others': root's sessions, other engineers'
tests), and `pip install ~/qywx-ray` in setup goes into its venv, not into the machine's
Python.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qywx_ray.devstack.procs import ManagedProcess, free_port, port_open, wait_until
from qywx_ray.devstack.raycluster import stop_ray_under

NODE_USER = "qywxnode"
PYTHON_MOUNT = Path("/opt/qywx-node-python")
SUDOERS = Path("/etc/sudoers.d/qywx-node")
# The packages the drill needs that a minimal Debian lacks (installed if missing).
VENV_ARGS = ("--system-site-packages",)  # Ray and the rest come from the image's Python
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "rsync": "rsync", "sudo": "sudo"}

RELAY = '''"""stdin/stdout <-> TCP: ssh's ProxyCommand, to reach sshd on a non-default port."""
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := sys.stdin.buffer.read1(65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data); sys.stdout.buffer.flush()
'''


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def install_missing_packages() -> list[str]:
    """apt-get install what is missing; services are not started (Debian's
    policy-rc.d is honoured: we start our own sshd)."""
    missing = [pkg for binary, pkg in PACKAGES.items() if not shutil.which(binary)]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env, timeout=600)
    return missing


def _as_node(argv: list[str], home: Path, timeout: float = 300) -> None:
    env = {**os.environ, "LD_LIBRARY_PATH": str(PYTHON_MOUNT / "lib")}
    run(["runuser", "-u", NODE_USER, "--", *argv], cwd=home, timeout=timeout, env=env)


@dataclass
class NodeUser:
    """The node's user, its Python and its login environment ("the VM image")."""

    ray_tmpdir: str  # short: Ray's sockets live under it
    created: bool = False
    mounted: bool = False

    @property
    def home(self) -> Path:
        return Path(pwd.getpwnam(NODE_USER).pw_dir)

    def prepare(self) -> NodeUser:
        try:
            pwd.getpwnam(NODE_USER)
        except KeyError:
            run(["useradd", "--create-home", "--shell", "/bin/bash", NODE_USER])
            # No password, not locked: sshd (without PAM) refuses a locked account ("!").
            run(["usermod", "-p", "*", NODE_USER])
            self.created = True
        home = self.home
        base = Path(sys.base_prefix)
        PYTHON_MOUNT.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(PYTHON_MOUNT):
            run(["mount", "--bind", str(base), str(PYTHON_MOUNT)])
            run(["mount", "-o", "remount,ro,bind", str(PYTHON_MOUNT)])
            self.mounted = True
        venv = home / "venv"
        if not (venv / "bin" / "python3.11").exists():
            _as_node(
                [str(PYTHON_MOUNT / "bin" / "python3.11"), "-m", "venv", *VENV_ARGS, str(venv)],
                home,
            )
        # pip puts no `ray` script into the venv (Ray comes from the base site): the
        # entry point pip would have written for a fresh install.
        ray_bin = venv / "bin" / "ray"
        ray_bin.write_text(
            f"#!{venv}/bin/python3.11\nimport sys\nfrom ray.scripts.scripts import main\n"
            "sys.exit(main())\n"
        )
        ray_bin.chmod(0o755)
        shutil.chown(ray_bin, NODE_USER, NODE_USER)
        bashrc = home / ".bashrc"
        bashrc.write_text(
            "# written by tests/drills/sshnode.py: the node image's login environment\n"
            f"export PATH={venv}/bin:$PATH\n"
            # The interpreter's RUNPATH names /root/.pyenv/..., unreadable to this user:
            # without this the loader picks Debian's older libpython3.11 (undefined
            # symbols in _ssl: "the SSL module is not available" in pip).
            f"export LD_LIBRARY_PATH={PYTHON_MOUNT}/lib\n"
            f"export RAY_TMPDIR={self.ray_tmpdir}\n"
            "export RAY_USAGE_STATS_ENABLED=0\n"
        )
        shutil.chown(bashrc, NODE_USER, NODE_USER)
        Path(self.ray_tmpdir).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.ray_tmpdir, NODE_USER, NODE_USER)
        SUDOERS.parent.mkdir(mode=0o750, exist_ok=True)
        SUDOERS.write_text(
            f"{NODE_USER} ALL=(root) NOPASSWD: /usr/bin/mkdir -p /var/lib/qywx-ray "
            f"/var/log/qywx, /usr/bin/chown -R {NODE_USER} /var/lib/qywx-ray /var/log/qywx\n"
        )
        SUDOERS.chmod(0o440)
        return self

    def pids(self) -> list[int]:
        """Every process of the node user still running."""
        uid = pwd.getpwnam(NODE_USER).pw_uid
        out = []
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError, ValueError):
                for line in status.read_text().splitlines():
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        out.append(int(status.parent.name))
        return out

    def cleanup(self) -> None:
        stop_ray_under(self.ray_tmpdir)
        for pid in self.pids():  # only the node user's: ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        SUDOERS.unlink(missing_ok=True)
        if self.mounted:
            subprocess.run(["umount", str(PYTHON_MOUNT)], check=False)
        shutil.rmtree(self.ray_tmpdir, ignore_errors=True)


@dataclass
class LoopbackSshd:
    """Our own sshd on 127.0.0.1:<free port>, accepting one throwaway key for NODE_USER."""

    workdir: Path
    home: Path
    port: int = 0
    process: ManagedProcess | None = field(default=None, init=False)

    @property
    def client_key(self) -> Path:
        return self.workdir / "client_key"

    @property
    def relay(self) -> Path:
        return self.workdir / "relay.py"

    def proxy_command(self) -> str:
        return f"/usr/bin/python3 {self.relay} 127.0.0.1 {self.port}"

    def start(self) -> LoopbackSshd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        host_key = self.workdir / "host_key"
        for key in (host_key, self.client_key):
            if not key.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        auth = ssh_dir / "authorized_keys"
        auth.write_text(Path(f"{self.client_key}.pub").read_text())
        auth.chmod(0o600)
        for path in (ssh_dir, auth):
            shutil.chown(path, NODE_USER, NODE_USER)
        self.relay.write_text(RELAY)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        config = self.workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"PidFile {self.workdir / 'sshd.pid.own'}",
                    f"AllowUsers {NODE_USER}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitRootLogin no",
                    "X11Forwarding no",
                    "AllowTcpForwarding yes",  # ray up forwards the dashboard port
                    "Subsystem sftp internal-sftp",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        self.process = ManagedProcess(
            "sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], self.workdir
        )
        self.process.start()
        wait_until(lambda: port_open(self.port), timeout_s=30, what=f"sshd on {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

"""A multi-node Ray cluster on this machine: a head plus worker nodes, each its own raylet.

Built on `ray.cluster_utils.Cluster` (what Ray's own fault-tolerance tests use): every node
has its own raylet, object store, workers and custom resources (`qywx_head` on the head,
`qywx_worker` and `qywx_<name>` on each worker), all on loopback. `remove_worker` kills a
node's raylet and every worker on it at once (a VM loss, as near as one machine gets);
`kill_gcs`/`restart_gcs` stop and start the head's GCS, which keeps its tables across the
restart only when the cluster was started with a Redis for the GCS (`gcs_redis_address`:
Ray's GCS fault tolerance, the production setting; that Redis must not be the data Redis).

Sizing for a 2-core box: 1 CPU per node by default and a 100 MiB object store each.
`persist=True` (for `qywx-ray dev up --ray-nodes N`) leaves the processes running after
this Python process exits and records their PIDs in `<root>/ray-cluster.json`, so
`stop_recorded` stops them by PID (never `ray stop`, which would end every Ray here).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qywx_ray.devstack.procs import pid_alive, wait_until

STATE_FILE = "ray-cluster.json"
HEAD_RESOURCE = "qywx_head"
WORKER_RESOURCE = "qywx_worker"


@dataclass
class LocalRayCluster:
    nodes: int = 3  # head included
    cpus_per_node: float = 1.0
    object_store_mb: int = 100
    gcs_redis_address: str | None = None  # "127.0.0.1:port": GCS fault tolerance
    include_dashboard: bool = False
    persist: bool = False
    system_config: dict[str, Any] = field(default_factory=dict)  # Ray's _system_config
    # Ray's temp dir (sessions, logs, sockets) for every node: keep it short (Unix socket
    # paths end up under it, 107 bytes at most). Our own directory lets `stop_ray_under`
    # find exactly this cluster's processes; None: Ray's default (/tmp/ray, shared).
    temp_dir: str | None = None
    # "127.0.0.1" keeps every node on loopback (dev up). Left to Ray (the machine's own
    # address) in tests: a driver in the process that started a loopback cluster hung in
    # ray.init's GCS connect here, while a driver in another process connected fine.
    node_ip: str | None = None
    cluster: Any = None
    workers: dict[str, Any] = field(default_factory=dict)  # name -> ray Node
    _next: int = 1

    def start(self) -> LocalRayCluster:
        from ray.cluster_utils import Cluster

        head_args: dict[str, Any] = {
            "num_cpus": self.cpus_per_node,
            "resources": {HEAD_RESOURCE: 100.0},
            "object_store_memory": self.object_store_mb * 1024 * 1024,
            "include_dashboard": self.include_dashboard,
            **self._ip(),
        }
        if self.gcs_redis_address:
            head_args["external_addresses"] = [self.gcs_redis_address]
        if self.system_config:
            head_args["_system_config"] = dict(self.system_config)
        if self.temp_dir:
            head_args["temp_dir"] = self.temp_dir  # worker nodes take the head's
        self.cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args=head_args,
            shutdown_at_exit=not self.persist,
        )
        for _ in range(self.nodes - 1):
            self.add_worker()
        self.cluster.wait_for_nodes()
        return self

    def _ip(self) -> dict[str, Any]:
        return {"node_ip_address": self.node_ip} if self.node_ip else {}

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def head(self) -> Any:
        return self.cluster.head_node

    def add_worker(self) -> str:
        """A new worker node (`w1`, `w2`, ...); returns its name."""
        name = f"w{self._next}"
        self._next += 1
        self.workers[name] = self.cluster.add_node(
            num_cpus=self.cpus_per_node,
            resources={WORKER_RESOURCE: 100.0, f"qywx_{name}": 100.0},
            object_store_memory=self.object_store_mb * 1024 * 1024,
            **self._ip(),
        )
        return name

    def remove_worker(self, name: str) -> str:
        """Kill the node's raylet and everything on it at once (no graceful step);
        returns its node id."""
        node = self.workers.pop(name)
        node_id = str(node.node_id)
        tree = _with_descendants(
            [int(i.process.pid) for v in node.all_processes.values() for i in v]
        )
        self.cluster.remove_node(node, allow_graceful=False)
        _kill_survivors(tree)  # agents the dead raylet leaves behind: gone with the VM
        return node_id

    def node_names(self) -> dict[str, str]:
        """Node id -> `head` / `w1` / ... for the nodes this object started."""
        out = {str(self.head.node_id): "head"}
        out.update({str(n.node_id): name for name, n in self.workers.items()})
        return out

    def kill_gcs(self) -> None:
        self.head.kill_gcs_server()

    def restart_gcs(self) -> None:
        self.head.start_gcs_server()

    def wait_node_dead(self, node_id: str, timeout_s: float = 120.0) -> None:
        """Until the GCS has marked the node dead (what makes Ray restart its actors)."""
        import ray

        def dead() -> bool:
            return any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes())

        wait_until(dead, timeout_s=timeout_s, what=f"node {node_id[:8]} marked dead")

    def pids(self) -> list[int]:
        """Every process of every node (the workers' actor processes die with their raylet)."""
        nodes = [self.head, *self.workers.values()]
        out = []
        for node in nodes:
            for infos in node.all_processes.values():
                out += [int(info.process.pid) for info in infos]
        return out

    def record(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        path = root / STATE_FILE
        path.write_text(
            json.dumps({"address": self.address, "nodes": self.nodes, "pids": self.pids()})
        )
        return path

    def shutdown(self) -> None:
        if self.cluster is not None:
            tree = _with_descendants(self.pids())
            with contextlib.suppress(Exception):
                self.cluster.shutdown()
            _kill_survivors(tree)
            self.cluster = None
            self.workers.clear()


def recorded_cluster(root: Path) -> dict[str, Any] | None:
    """The recorded cluster if any of its processes still runs."""
    try:
        state: dict[str, Any] = json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if any(pid_alive(int(p)) for p in state.get("pids", [])) else None


def stop_recorded(root: Path, timeout_s: float = 15.0) -> int:
    """Stop the processes `record` wrote down, by PID (SIGTERM, then SIGKILL); how many
    were running."""
    path = root / STATE_FILE
    try:
        pids = [int(p) for p in json.loads(path.read_text()).get("pids", [])]
    except (OSError, ValueError):
        return 0
    # The raylets' own children (dashboard and runtime-env agents, actor workers) are
    # not in the record: they are found now, before their parents go.
    running = [p for p in _with_descendants(pids) if pid_alive(p)]
    _stop_pids(running, timeout_s)
    path.unlink(missing_ok=True)
    return len(running)


def ray_pids_under(temp_dir: str) -> list[int]:
    """PIDs of the Ray processes started with `temp_dir` (each names it, or a session
    directory inside it, on its command line), and their descendants (actor workers).

    What lets us stop one Ray of several on this machine: `ray stop` matches process
    names, so it ends every Ray here, other people's included."""
    marker = os.path.abspath(temp_dir).rstrip("/") + "/"
    roots = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            args = cmdline.read_bytes().split(b"\0")
            pid = int(cmdline.parent.name)
            if pid != os.getpid() and any(marker.encode() in a + b"/" for a in args):
                roots.append(pid)
    return _with_descendants(roots)


def stop_ray_under(temp_dir: str, timeout_s: float = 15.0) -> int:
    """Stop, by PID, the Ray that runs with `temp_dir` (SIGTERM, then SIGKILL after
    `timeout_s`); how many processes were running. Never touches another Ray."""
    running = [p for p in ray_pids_under(temp_dir) if pid_alive(p)]
    return _stop_pids(running, timeout_s)


def _stop_pids(running: list[int], timeout_s: float) -> int:
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = [pid for pid in running if pid_alive(pid)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # SIGKILL is delivered, not done: wait (bounded) until they are gone, so a caller
    # that checks right after sees them stopped.
    deadline = time.monotonic() + 10.0
    while any(pid_alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(running)


def _with_descendants(pids: list[int]) -> list[int]:
    """`pids` and every live descendant of them (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: list[int] = []

    def walk(pid: int) -> None:
        for child in children.get(pid, []):
            walk(child)
        if pid not in out:
            out.append(pid)

    for pid in pids:
        walk(pid)
    return out


def _kill_survivors(pids: list[int]) -> None:
    """SIGKILL, by PID, whatever of `pids` outlived its node's shutdown."""
    for pid in pids:
        if pid != os.getpid() and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class LocalAutoscalingCluster:
    """A head whose autoscaler adds and removes worker nodes on this machine (Ray's fake
    multi-node provider, what `ray.cluster_utils.AutoscalingCluster` starts).

    Not `AutoscalingCluster` itself: its `start()` runs `ray stop --force` first and last,
    ending every Ray on the machine, puts the GCS on 6379, and its constructor reads
    `fake_multi_node/example.yaml`, which the Ray 2.60 wheel installed here does not ship
    (FileNotFoundError). Here the same config is built in code (`fake_multinode_config`),
    the head runs with its own temp dir and a free port, the provider is pointed at that
    port, and `shutdown` stops by PID (`stop_ray_under`). Worker nodes are started by the
    head's autoscaler (they inherit the temp dir), so they are found the same way.
    """

    temp_dir: str
    worker_types: dict[
        str, Any
    ]  # autoscaler node types, e.g. {"w": {"resources": ..., "max_workers": 2}}
    head_cpus: float = 1.0
    head_resources: dict[str, float] = field(default_factory=dict)
    idle_timeout_minutes: float = 0.25
    port: int = 0
    address: str = ""

    def start(self, timeout_s: float = 120.0) -> LocalAutoscalingCluster:
        import subprocess
        import sys

        from ray._private.services import get_node_ip_address

        from qywx_ray.devstack.procs import free_port

        self.port = self.port or free_port()
        self.address = f"{get_node_ip_address()}:{self.port}"
        config = fake_multinode_config(
            {"CPU": self.head_cpus, **self.head_resources},
            self.worker_types,
            idle_timeout_minutes=self.idle_timeout_minutes,
            gcs_address=self.address,  # not the provider's default, 6379
        )
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(config))
        ray_bin = str(Path(sys.executable).with_name("ray"))
        argv = [ray_bin, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}"]
        argv += [f"--autoscaling-config={config_path}", f"--num-cpus={self.head_cpus:g}"]
        argv += ["--include-dashboard=false", "--disable-usage-stats"]
        if self.head_resources:
            argv.append(f"--resources={json.dumps(self.head_resources)}")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        # `ray start --head` turns Ray 2.60's token auth on when ~/.ray/auth_token exists;
        # a driver in a process that imported Ray without RAY_AUTH_MODE=token then fails
        # every GCS call ("InvalidAuthToken", seen here) even if the variable is set later.
        # Off, as for the in-process test clusters (`ray.init`, `Cluster` start without it).
        env["RAY_AUTH_MODE"] = "disabled"
        subprocess.run(argv, check=True, capture_output=True, text=True, env=env, timeout=timeout_s)
        return self

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The nodes the GCS has alive (needs `ray.init(address=self.address)`)."""
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def shutdown(self) -> int:
        return stop_ray_under(self.temp_dir)


def fake_multinode_config(
    head_resources: dict[str, float],
    worker_types: dict[str, Any],
    *,
    idle_timeout_minutes: float,
    gcs_address: str,
) -> dict[str, Any]:
    """The autoscaler config `AutoscalingCluster` builds (Ray's
    `fake_multi_node/example.yaml` with the given node types), for the fake provider."""
    return {
        "cluster_name": "qywx-fake-multinode",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            **worker_types,
            "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }

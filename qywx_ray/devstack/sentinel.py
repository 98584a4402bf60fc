"""A real local Redis Sentinel setup for tests and fault drills: 1 master, N replicas, 3 sentinels.

Uses Debian's redis-server (sentinels run as `redis-server <conf> --sentinel`) on loopback
free ports inside one work directory; every process is stopped by PID. `failover()` asks
the sentinels for a graceful switch, `kill_master()` crashes the master (SIGKILL) for a
hard one; both return only when every sentinel names the same new master. Every wait is
bounded. This module must never touch a Redis it did not start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from qywx_ray.devstack.procs import ManagedProcess, free_port, port_open, wait_until
from qywx_ray.devstack.redis import redis_server_bin
from qywx_ray.errors import InfraError

HOST = "127.0.0.1"
Addr = tuple[str, int]


def _client(port: int, timeout_s: float = 0.5) -> redis.Redis:
    return redis.Redis(
        host=HOST, port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )


@dataclass
class _Node:
    """One redis-server (data node or sentinel) and its process."""

    name: str
    port: int
    argv: list[str]
    workdir: Path
    process: ManagedProcess | None = None

    def start(self) -> None:
        if port_open(self.port):
            raise InfraError(f"{self.name}: port {self.port} is already in use")
        self.process = ManagedProcess(self.name, self.argv, self.workdir)
        self.process.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def tail(self) -> str:
        return self.process.tail() if self.process else ""

    def kill9(self) -> None:
        if self.process:
            self.process.kill9()

    def stop(self) -> None:
        if self.process:
            self.process.stop(timeout_s=10.0)


@dataclass
class SentinelCluster:
    """`SentinelCluster(tmpdir).start()`; `.sentinel_addrs`, `.master_name` for RedisSettings."""

    workdir: Path
    master_name: str = "qywxmaster"
    replicas: int = 1
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 10_000
    # The master refuses writes (NOREPLICAS) unless this many replicas acked within
    # `min_replicas_max_lag_s`. With 1, a master cut off from its replica by a failover
    # stops acknowledging writes the promotion is about to discard (split brain); clients
    # retry them on the new master. 0 = Redis' default (accept, and lose them).
    min_replicas_to_write: int = 0
    min_replicas_max_lag_s: int = 2
    data: list[_Node] = field(default_factory=list, init=False)
    watchers: list[_Node] = field(default_factory=list, init=False)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> SentinelCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        ports = [free_port() for _ in range(1 + self.replicas)]
        master_port = ports[0]
        for i, port in enumerate(ports):
            extra = [] if i == 0 else ["--replicaof", HOST, str(master_port)]
            node = _Node(f"redis-{port}", port, self._data_argv(port) + extra, self.workdir)
            node.start()
            self.data.append(node)
        for node in self.data:
            wait_until(
                lambda n=node: self._pingable(n),  # type: ignore[misc]
                timeout_s=timeout_s,
                what=f"redis-server on port {node.port}",
            )
        wait_until(
            lambda: self._replicas_linked(master_port, self.replicas),
            timeout_s=timeout_s,
            what=f"{self.replicas} replica(s) in sync with the master",
        )
        sentinel_ports = [free_port() for _ in range(self.sentinels)]
        ids = {p: hashlib.sha1(f"qywx-sentinel-{p}".encode()).hexdigest() for p in sentinel_ports}
        for port in sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(self._sentinel_conf(port, master_port, ports[1:], ids))
            node = _Node(
                f"sentinel-{port}",
                port,
                [redis_server_bin(), str(conf), "--sentinel"],
                self.workdir,
            )
            node.start()
            self.watchers.append(node)
        wait_until(
            self._sentinels_ready,
            timeout_s=timeout_s,
            what=f"{self.sentinels} sentinels agreeing on master {self.master_name}",
            interval_s=0.2,
        )

    def stop(self) -> None:
        for node in [*self.watchers, *self.data]:
            node.stop()

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- configuration ---------------------------------------------------------------

    def _data_argv(self, port: int) -> list[str]:
        return [
            redis_server_bin(),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(self.workdir),
            "--dbfilename",
            f"dump-{port}.rdb",
            "--appendonly",
            "yes",
            "--appendfilename",
            f"appendonly-{port}.aof",
            "--appenddirname",
            f"aof-{port}",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--replica-announce-ip",
            HOST,
            # A demoted master resyncs at once (the default waits 5 s for more replicas),
            # so the new master has its replica back within ~0.1 s.
            "--repl-diskless-sync-delay",
            "0",
            "--min-replicas-to-write",
            str(self.min_replicas_to_write),
            "--min-replicas-max-lag",
            str(self.min_replicas_max_lag_s),
        ]

    def _sentinel_conf(
        self, port: int, master_port: int, replica_ports: Sequence[int], ids: dict[int, str]
    ) -> str:
        name = self.master_name
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f"dir {self.workdir}",
            "daemonize no",
            f"sentinel myid {ids[port]}",
            f"sentinel announce-ip {HOST}",
            f"sentinel monitor {name} {HOST} {master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        # Pre-seed what sentinels would otherwise discover in ~10 s (INFO) and ~2 s (hello).
        lines += [f"sentinel known-replica {name} {HOST} {p}" for p in replica_ports]
        lines += [f"sentinel known-sentinel {name} {HOST} {p} {ids[p]}" for p in ids if p != port]
        return "\n".join(lines) + "\n"

    # ---- inspection ------------------------------------------------------------------

    @property
    def sentinel_addrs(self) -> list[str]:
        return [f"{HOST}:{n.port}" for n in self.watchers]

    @property
    def data_ports(self) -> list[int]:
        return [n.port for n in self.data]

    def _pingable(self, node: _Node) -> bool:
        if not node.alive():
            raise InfraError(f"{node.name} exited:\n{node.tail()}")
        try:
            with _client(node.port) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def _replicas_linked(self, master_port: int, expected: int) -> bool:
        try:
            with _client(master_port) as c:
                info = c.info("replication")
        except redis.RedisError:
            return False
        # "online" is not enough: after a diskless sync the master streams nothing until
        # the replica's first REPLCONF ACK (up to 1 s later), so writes acknowledged in
        # between would be lost by a failover. A replica that has ACKed has offset > 0.
        online = [
            v
            for k, v in info.items()
            if k.startswith("slave")
            and isinstance(v, dict)
            and v.get("state") == "online"
            and int(v.get("offset", 0)) > 0
        ]
        return info.get("role") == "master" and len(online) >= expected

    def role(self, port: int) -> str | None:
        """`master`, `slave`, or None when the node does not answer."""
        try:
            with _client(port) as c:
                return str(c.info("replication").get("role"))
        except redis.RedisError:
            return None

    def sentinel_views(self) -> list[Addr | None]:
        """What each live sentinel names as the master (None if it does not answer)."""
        views: list[Addr | None] = []
        for node in self.watchers:
            try:
                with _client(node.port) as c:
                    addr = c.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
                views.append((_s(addr[0]), int(addr[1])) if addr else None)
            except redis.RedisError:
                views.append(None)
        return views

    def master(self) -> Addr:
        """The master every sentinel agrees on; raises InfraError when they disagree."""
        views = set(self.sentinel_views())
        if len(views) != 1 or None in views:
            raise InfraError(f"sentinels disagree on the master: {sorted(map(str, views))}")
        addr = views.pop()
        assert addr is not None
        return addr

    def _sentinels_ready(self) -> bool:
        for node in self.watchers:
            if not node.alive():
                raise InfraError(f"{node.name} exited:\n{node.tail()}")
            try:
                with _client(node.port) as c:
                    raw = c.execute_command("SENTINEL", "MASTER", self.master_name)
            except redis.RedisError:
                return False
            info = _pairs(raw)
            if (
                int(info.get("num-slaves", 0)) < self.replicas
                or int(info.get("num-other-sentinels", 0)) < self.sentinels - 1
                or "s_down" in info.get("flags", "")
            ):
                return False
        return len(set(self.sentinel_views())) == 1

    def _converged_on(self, old: Addr) -> Addr | None:
        views = self.sentinel_views()
        if None in views or len(set(views)) != 1 or views[0] == old:
            return None
        new = views[0]
        assert new is not None
        return new if self.role(new[1]) == "master" else None

    # ---- faults ----------------------------------------------------------------------

    def failover(self, timeout_s: float = 30.0, *, nudge_old_master: bool = True) -> Addr:
        """SENTINEL FAILOVER, then wait until all sentinels name the new master and the old
        master serves as its replica again (so WAIT 1 can succeed). Returns the new master.

        Sentinels demote the old master only on their next INFO round (~10-15 s here);
        `nudge_old_master` sends it the same REPLICAOF right away so drills run faster."""
        old = self.master()
        ask = self.watchers[0].port

        def requested() -> bool:
            try:
                with _client(ask, timeout_s=2.0) as c:
                    c.execute_command("SENTINEL", "FAILOVER", self.master_name)
                return True
            except redis.ResponseError as exc:  # NOGOODSLAVE: sentinel not ready yet
                return "INPROG" in str(exc)  # INPROG: a failover is already running

        wait_until(requested, timeout_s=timeout_s, what="a sentinel to accept FAILOVER")
        new: list[Addr] = []

        def switched() -> bool:
            addr = self._converged_on(old)
            if addr is not None:
                new[:] = [addr]
            return addr is not None

        wait_until(switched, timeout_s=timeout_s, what="sentinels to agree on a new master")
        if nudge_old_master and self.role(old[1]) == "master":
            try:
                with _client(old[1], timeout_s=2.0) as c:
                    c.execute_command("REPLICAOF", new[0][0], str(new[0][1]))
            except redis.RedisError:
                pass  # the sentinels will do it on their own schedule
        wait_until(
            lambda: self._replicas_linked(new[0][1], self.replicas),
            timeout_s=timeout_s,
            what="the old master to resync as a replica",
        )
        return new[0]

    def kill_master(self, timeout_s: float = 30.0) -> Addr:
        """SIGKILL the master's process; return the master the sentinels then elect."""
        old = self.master()
        victim = next(n for n in self.data if n.port == old[1])
        victim.kill9()
        new: list[Addr] = []

        def elected() -> bool:
            addr = self._converged_on(old)
            if addr is not None:
                new[:] = [addr]
            return addr is not None

        wait_until(elected, timeout_s=timeout_s, what="sentinels to elect a new master")
        return new[0]

    def restart(self, port: int, timeout_s: float = 30.0) -> None:
        """Start a killed data node again; sentinels reconfigure it as a replica of the
        current master. Waits until the master counts all replicas in sync."""
        node = next(n for n in self.data if n.port == port)
        if node.alive():
            raise InfraError(f"{node.name} is still running")
        node.start()
        wait_until(lambda: self._pingable(node), timeout_s=timeout_s, what=f"{node.name} up")
        current = self.master()
        wait_until(
            lambda: self._replicas_linked(current[1], self.replicas),
            timeout_s=timeout_s,
            what=f"{node.name} to rejoin as a replica of port {current[1]}",
        )


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(raw: object) -> dict[str, str]:
    """SENTINEL MASTER answers a flat list (RESP2) or a map (RESP3)."""
    if isinstance(raw, dict):
        return {_s(k): _s(v) for k, v in raw.items()}
    items = list(raw) if isinstance(raw, list | tuple) else []
    return {_s(items[i]): _s(items[i + 1]) for i in range(0, len(items) - 1, 2)}

"""A cluster of network namespaces: every node its own network stack, joined by shaped links.

On one machine, loopback addresses make a "multi-node" cluster real TCP between real processes,
but every node shares one network stack: no link has a speed and no cable can be cut. Here each
node of the cluster description gets a network namespace with one interface (``eth0``) and its
own address; the switches are Linux bridges in this (the root) namespace:

- a bridge per leaf, and one per zone for the zone's spine layer;
- a veth pair per link: node <-> its leaf (the node's NIC, ``nic_gbps``), leaf <-> its zone's
  spine (``uplink_gbps``), and between the zones' spines (``interzone_gbps``; two zones are joined
  directly, three or more through a core bridge, so the bridges never form a loop);
- each veth end shaped on egress with a token bucket (``tc qdisc ... tbf``), so both directions
  of a link run at its rate (a rate left out of the description leaves the link unshaped).

Every name carries the cluster's tag: namespaces ``ff<tag>-<node>``, interfaces
``ff<tag>-<kind><index>`` (at most 15 characters; kinds: e a node's cable, L leaf, S spine,
u/d leaf uplink, x/c inter-zone), and the /24 subnet is derived from the tag,
so two clusters, or a crashed run's leftovers, never collide. This namespace gets an address on
the fabric (``host_address``, on the first zone's spine bridge) that reaches every node.

Cutting a link sets its veth pair down: a real partition (packets are dropped, connections
stall until their timeouts), not an error injected into our own code.

[Note: switches as bridges in the root namespace] A bridge forwards in the kernel without a
namespace hop of its own, and ``ip link`` in the root namespace shows (and ``down`` removes)
everything the cluster made. The cost: the fabric is one L2 segment, so nothing models routing
between leaves; the paths (and so the shaped links a packet crosses) are the fat-tree's.

Needs root, ``ip`` and ``tc`` (iproute2), and a kernel with network namespaces, veth, bridge and
tbf; :func:`unavailable` says which is missing.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from network.rundir import pid_alive
from network.topology import Cluster

__all__ = ["NetnsCluster", "NetnsError", "unavailable", "Link", "path_gbit", "subnet_of", "probe_description"]

_TAG = re.compile(r"^[a-z0-9]{1,6}$")
_CMD_TIMEOUT = 30.0
MTU = 9000  # data-centre jumbo frames: fewer packets through the bridges on a small machine


class NetnsError(RuntimeError):
    """A namespace cluster could not be made, changed or removed (the message names the command)."""


@dataclass(frozen=True)
class Link:
    """One cable: its two ends by name (node, leaf, spine), its rate and its veth pair.

    ``devs`` are (namespace or "", interface) for each end; the first end is in the root
    namespace (the cut sets it down, and its peer loses its carrier).
    """

    a: str
    b: str
    rate_gbit: float | None
    devs: tuple[tuple[str, str], tuple[str, str]]


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    """Run one ``ip``/``tc`` command; a failure raises NetnsError naming the command and stderr."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]}: command not found (install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)}: no answer within {_CMD_TIMEOUT:.0f} s") from None
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


@functools.cache
def unavailable() -> str | None:
    """Why namespace clusters cannot be made here (not root, no ``ip``/``tc``, no netns, veth,
    bridge or tbf), or None when they can. Tries each on a throw-away namespace once per process."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (install iproute2)"
    ns = f"ffprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", ns])
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        _run(["ip", "-n", ns, "link", "add", "b0", "type", "bridge"])
        _run(["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1gbit", "burst", "128kb",
              "latency", "50ms"])
    except NetnsError as exc:
        return f"namespaces work but the fabric does not (veth, bridge or tbf): {exc}"
    finally:
        _run(["ip", "netns", "del", ns], check=False)
    return None


def subnet_of(tag: str) -> ipaddress.IPv4Network:
    """The cluster's /24 from its tag: inside 10.200.0.0/16 .. 10.249.255.0/24."""
    h = hashlib.sha256(tag.encode()).digest()
    return ipaddress.IPv4Network(f"10.{200 + h[0] % 50}.{h[1]}.0/24")


class NetnsCluster:
    """The namespaces, bridges and shaped veth links of one cluster description (see module doc)."""

    def __init__(self, cluster: Cluster, tag: str) -> None:
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise NetnsError(f"tag {tag!r}: expected 1 to 6 lower-case letters or digits")
        if len(cluster.nodes) > 200:
            raise NetnsError(f"cluster {cluster.name}: {len(cluster.nodes)} nodes; a namespace cluster holds at "
                             "most 200")
        self.cluster = cluster
        self.tag = tag
        self.prefix = f"ff{tag}-"
        self.subnet = subnet_of(tag)
        hosts = list(self.subnet.hosts())
        self.host_address = str(hosts[0])
        order = cluster.ordered()
        self.namespaces = {n: f"{self.prefix}{n}" for n in order}
        self.addresses = {n: str(hosts[10 + i]) for i, n in enumerate(order)}
        self._plan()

    # -- the plan: pure, from the description and the tag ------------------------------------------
    def _dev(self, kind: str, i: int) -> str:
        return f"{self.prefix}{kind}{i}"

    def _plan(self) -> None:
        c = self.cluster
        zones = sorted(c.zones.values(), key=lambda z: z.index)
        self.spine_name = {z.name: (z.spines[0] if z.spines else z.name) for z in zones}
        self.bridges = [self._dev("L", lf.index) for lf in c.leaves.values()] + \
            [self._dev("S", z.index) for z in zones]
        self.links_: list[Link] = []
        for n in c.ordered():
            node = c.node(n)
            self.links_.append(Link(n, node.leaf, node.nic_gbps,
                                    (("", self._dev("e", node.index)), (self.namespaces[n], "eth0"))))
        for lf in sorted(c.leaves.values(), key=lambda x: x.index):
            self.links_.append(Link(lf.name, self.spine_name[lf.zone], lf.uplink_gbps,
                                    (("", self._dev("u", lf.index)), ("", self._dev("d", lf.index)))))
        if len(zones) == 2:
            z0, z1 = zones
            self.links_.append(Link(self.spine_name[z0.name], self.spine_name[z1.name], c.interzone_gbps,
                                    (("", self._dev("x", 0)), ("", self._dev("x", 1)))))
        elif len(zones) > 2:
            self.bridges.append(self._dev("C", 0))
            for z in zones:
                self.links_.append(Link(self.spine_name[z.name], "core", c.interzone_gbps,
                                        (("", self._dev("x", z.index)), ("", self._dev("c", z.index)))))
        # which bridge each root-side veth end plugs into
        self._port: dict[str, str] = {}
        for n in c.ordered():
            node = c.node(n)
            self._port[self._dev("e", node.index)] = self._dev("L", c.leaves[node.leaf].index)
        for lf in c.leaves.values():
            self._port[self._dev("u", lf.index)] = self._dev("L", lf.index)
            self._port[self._dev("d", lf.index)] = self._dev("S", c.zones[lf.zone].index)
        for z in zones:
            self._port[self._dev("x", z.index)] = self._dev("S", z.index)
            if len(zones) > 2:
                self._port[self._dev("c", z.index)] = self._dev("C", 0)

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self) -> dict[str, str]:
        """Create every namespace, bridge and link; {node name: its address in its namespace}.
        On failure, what was made is removed again and NetnsError says what failed."""
        leftovers = self._existing_namespaces() + self._existing_devs()
        if leftovers:
            raise NetnsError(f"namespace cluster {self.tag!r} already exists ({', '.join(leftovers[:4])}...): "
                             f"pick another tag, or remove it with NetnsCluster(cluster, {self.tag!r}).down()")
        self._check_subnet_free()
        try:
            self._make()
        except BaseException:
            self.down()
            raise
        return dict(self.addresses)

    def _check_subnet_free(self) -> None:
        out = _run(["ip", "-4", "-o", "route", "show"]).stdout
        for line in out.splitlines():
            dst = line.split()[0]
            if dst == "default":
                continue
            try:
                net = ipaddress.IPv4Network(dst, strict=False)
            except ValueError:
                continue
            if net.overlaps(self.subnet) and net.prefixlen > 0:
                raise NetnsError(f"subnet {self.subnet} of tag {self.tag!r} overlaps a route of this host "
                                 f"({line.strip()}): pick another tag")

    def _make(self) -> None:
        plen = self.subnet.prefixlen
        for br in self.bridges:
            _run(["ip", "link", "add", br, "mtu", str(MTU), "type", "bridge", "stp_state", "0",
                  "forward_delay", "0"])
        for ns in self.namespaces.values():
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for link in self.links_:
            (ns_a, dev_a), (ns_b, dev_b) = link.devs
            peer = ["peer", "name", dev_b] + (["netns", ns_b] if ns_b else [])
            _run(["ip", "link", "add", dev_a, "mtu", str(MTU), "type", "veth", *peer])
            _run(self._ip(ns_b) + ["link", "set", dev_b, "mtu", str(MTU)])  # `add ... mtu` sets one end
            for ns, dev in link.devs:
                if not ns:
                    _run(["ip", "link", "set", dev, "master", self._port[dev]])
                if link.rate_gbit is not None:
                    _run(self._tc(ns) + ["qdisc", "add", "dev", dev, "root", *_tbf(link.rate_gbit)])
        for n, ns in self.namespaces.items():
            _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[n]}/{plen}", "dev", "eth0"])
        _run(["ip", "addr", "add", f"{self.host_address}/{plen}", "dev", self.bridges[len(self.cluster.leaves)]])
        for br in self.bridges:
            _run(["ip", "link", "set", br, "up"])
        for link in self.links_:
            for ns, dev in link.devs:
                _run(self._ip(ns) + ["link", "set", dev, "up"])

    @staticmethod
    def _ip(ns: str) -> list[str]:
        return ["ip", "-n", ns] if ns else ["ip"]

    @staticmethod
    def _tc(ns: str) -> list[str]:
        return ["tc", "-n", ns] if ns else ["tc"]

    def down(self) -> None:
        """Remove everything of this tag: processes left in its namespaces, the namespaces, the
        bridges and veths. Idempotent; what is already gone is no error (a failure to remove what
        is still there is)."""
        for ns in self._existing_namespaces():
            _kill_inside(ns)
            _run(["ip", "netns", "del", ns])
        for dev in self._existing_devs():  # deleting one end of a veth deletes both
            p = _run(["ip", "link", "del", dev], check=False)
            if p.returncode != 0 and dev in self._existing_devs():
                raise NetnsError(f"ip link del {dev} failed: {p.stderr.strip()}")

    def _existing_namespaces(self) -> list[str]:
        out = _run(["ip", "netns", "list"]).stdout
        return [w.split()[0] for w in out.splitlines() if w.strip() and w.split()[0].startswith(self.prefix)]

    def _existing_devs(self) -> list[str]:
        out = _run(["ip", "-o", "link", "show"]).stdout
        names = [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
        return [d for d in names if d.startswith(self.prefix)]

    # -- use ---------------------------------------------------------------------------------------
    def wrap(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``node``'s namespace."""
        if node not in self.namespaces:
            raise NetnsError(f"no node {node!r} in namespace cluster {self.tag!r} (nodes: "
                             f"{', '.join(self.namespaces)})")
        return ["ip", "netns", "exec", self.namespaces[node], *argv]

    def _find(self, a: str, b: str) -> Link:
        a, b = self._canon(a), self._canon(b)
        for link in self.links_:
            if {link.a, link.b} == {a, b}:
                return link
        raise NetnsError(f"no link between {a!r} and {b!r} in namespace cluster {self.tag!r} (links: "
                         f"{', '.join(f'{x.a}-{x.b}' for x in self.links_)})")

    def _canon(self, name: str) -> str:
        """A zone's name or any of its spine names stands for the zone's spine bridge."""
        for z in self.cluster.zones.values():
            if name == z.name or name in z.spines:
                return self.spine_name[z.name]
        return name

    def link(self, a: str, b: str, up: bool) -> None:
        """Cut (``up=False``) or restore the link between ``a`` and ``b`` (nodes, leaves, spines)."""
        link = self._find(a, b)
        for ns, dev in link.devs:
            _run(self._ip(ns) + ["link", "set", dev, "up" if up else "down"])

    def links(self) -> list[dict]:
        """Every link: {"a", "b", "rate_gbit" (None: unshaped), "up"}, live from the kernel."""
        out = _run(["ip", "-j", "link", "show"]).stdout
        state = {d["ifname"]: "UP" in d.get("flags", []) for d in json.loads(out or "[]")}
        return [{"a": x.a, "b": x.b, "rate_gbit": x.rate_gbit, "up": state.get(x.devs[0][1], False)}
                for x in self.links_]

    def cluster_data(self) -> dict:
        """The cluster description (as a dict in the file's shape) with every node's address
        replaced by its address in its namespace: what services started with :meth:`wrap` read."""
        raw = json.loads(json.dumps(self.cluster.raw))  # a deep copy
        for nd in raw.get("node", []):
            nd["address"] = self.addresses[nd["name"]]
        return raw

    # -- persistence -------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """What :meth:`from_state` needs (JSON-safe): the tag and the cluster description."""
        return {"version": 1, "tag": self.tag, "cluster": self.cluster.raw, "source": self.cluster.source,
                "addresses": dict(self.addresses), "host_address": self.host_address}

    @classmethod
    def from_state(cls, state: dict) -> NetnsCluster:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise NetnsError(f"not a namespace cluster's state (version 1): {str(state)[:80]}")
        return cls(Cluster(state["cluster"], state.get("source", "<state>")), state["tag"])

    def __repr__(self) -> str:
        return f"<NetnsCluster {self.tag} of {self.cluster.name}: {len(self.namespaces)} nodes on {self.subnet}>"


def path_gbit(cluster: Cluster, a: str, b: str) -> float | None:
    """The shaped rate between nodes ``a`` and ``b``: the slowest link on their path (None when
    every link on it is unshaped)."""
    na, nb = cluster.node(a), cluster.node(b)
    rates = [na.nic_gbps, nb.nic_gbps]
    if na.leaf != nb.leaf:
        rates += [cluster.leaves[na.leaf].uplink_gbps, cluster.leaves[nb.leaf].uplink_gbps]
    if na.zone != nb.zone:
        rates.append(cluster.interzone_gbps)
    known = [r for r in rates if r is not None]
    return min(known) if known else None


def probe_description(nc: NetnsCluster, d: str | os.PathLike) -> Path:
    """A description of ``nc``'s nodes at their namespace addresses with only the link-probe
    responders and a cluster key of their own, written into ``d`` (``netns.toml``, ``cluster.key``):
    what the namespace tests and bench/topology.py probe the shaped links with."""
    import tomli_w

    from network import new_cluster_key

    d = Path(d)
    new_cluster_key().save(d / "cluster.key")
    raw = nc.cluster_data()
    raw["service"] = [s for s in raw["service"] if s["module"] == "network.probe"]
    for sec in ("haiplatform", "fs3"):
        raw.pop(sec, None)
    raw["security"] = {"key_file": "cluster.key"}
    path = d / "netns.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _tbf(gbit: float) -> list[str]:
    """tbf arguments for ``gbit``: a bucket of 1 ms at the rate (at least 128 KiB, so a 64 KiB
    GSO packet passes whole) and up to 50 ms of queue."""
    rate = int(gbit * 1e9)
    burst = max(128 << 10, rate // 8 // 1000)
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"]


def _kill_inside(ns: str) -> None:
    """End the processes still in namespace ``ns`` (SIGTERM, then SIGKILL after 2 s)."""
    pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split() if p.isdigit()]
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while alive and time.monotonic() < end:
            alive = [p for p in alive if pid_alive(p)]  # a zombie holds no namespace
            time.sleep(0.02)
        pids = alive
        if not pids:
            return


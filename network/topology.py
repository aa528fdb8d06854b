"""The cluster description: one TOML file says who is where and which services run on which node.

Format (see ``deploy/clusters/local.toml`` and ``docs/network.md``)::

    [cluster]
    name = "local"
    nic_gbps = 2.0           # link rates in Gbit/s (all optional; absent = unshaped):
    uplink_gbps = 2.0        #   a node's NIC, a leaf's uplink to its zone's spine,
    interzone_gbps = 0.5     #   the link between two zones' spines

    [[zone]]                 # a fat-tree zone: its spine switches
    name = "zone-a"
    spines = 1               # a count (names are generated) or a list of names

    [[leaf]]                 # a leaf switch in a zone
    name = "a-leaf0"
    zone = "zone-a"

    [[node]]                 # a host under a leaf
    name = "n0"
    address = "127.0.0.1"
    leaf = "a-leaf0"
    gpus = 0
    cpus = 2
    memory_gib = 4
    nic_gbps = 2.0           # optional: this node's NIC (default: [cluster] nic_gbps)

    [[service]]              # a service: `python -m MODULE --cluster FILE --node NODE` on each node
    module = "network.probe"
    nodes = "*"              # "*" for every node, or a list of node names
    port = 17100

    [fs3]                    # package sections: read and validated by their packages
    ...

Distances count links on the shortest path: 0 on the same node, 2 under one leaf
(node-leaf-node), 4 across leaves of a zone (node-leaf-spine-leaf-node), 6 across zones
(the zones are joined spine to spine through an inter-zone switch, as in Fire-Flyer 2).

Link rates describe the fabric, not this machine's: a node's NIC (``nic_gbps`` on the node,
default ``[cluster] nic_gbps``), a leaf's uplink to its zone's spine layer (``uplink_gbps`` on
the leaf, default ``[cluster] uplink_gbps``) and the link between zones (``[cluster]
interzone_gbps``). ``None`` (absent) means unshaped. The namespace cluster (``deploy.netns``)
shapes its links with them; placement and the trees use only the topology.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ClusterFileError

__all__ = ["Cluster", "Node", "Leaf", "Zone", "Service", "load_cluster", "dump_cluster", "PACKAGE_SECTIONS"]

#: Top-level tables that belong to packages; the topology keeps them as plain dicts.
PACKAGE_SECTIONS = ("network", "hfreduce", "haiscale", "fs3", "haiplatform", "deploy", "security")
SECURITY_KEYS = ("key_file", "encrypt", "idle_timeout", "handshake_timeout", "max_connections",
                 "max_connections_per_host")

_RATE_KEYS = ("nic_gbps", "uplink_gbps", "interzone_gbps")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class Zone:
    name: str
    spines: tuple[str, ...]
    index: int


@dataclass(frozen=True)
class Leaf:
    name: str
    zone: str
    index: int
    uplink_gbps: float | None = None  # to the zone's spine layer; None: unshaped


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    zone: str
    leaf: str
    gpus: int
    cpus: int
    memory_gib: float
    index: int
    labels: tuple[str, ...] = ()
    nic_gbps: float | None = None  # None: unshaped


@dataclass(frozen=True)
class Service:
    module: str
    nodes: tuple[str, ...]
    port: int
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def runs_on(self, node: str) -> bool:
        return node in self.nodes


class Cluster:
    """A validated cluster description with topology queries."""

    def __init__(self, data: dict, source: str = "<dict>", path: Path | None = None) -> None:
        self.source = source
        self.path = path
        self.raw = data
        self._parse(data)

    # -- parsing and validation -----------------------------------------------------------------
    def _err(self, key: str | None, problem: str) -> ClusterFileError:
        return ClusterFileError(self.source, key, problem)

    def _table(self, data: dict, key: str, required: bool = True) -> dict:
        if key not in data:
            if required:
                raise self._err(key, f"missing table [{key}]")
            return {}
        val = data[key]
        if not isinstance(val, dict):
            raise self._err(key, f"expected a table, got {_kind(val)}")
        return val

    def _array(self, data: dict, key: str) -> list[dict]:
        val = data.get(key, [])
        if not isinstance(val, list) or not all(isinstance(v, dict) for v in val):
            raise self._err(key, f"expected an array of tables ([[{key}]]), got {_kind(val)}")
        return val

    def _field(self, item: dict, where: str, key: str, typ, *, required: bool = True, default: Any = None,
               check=None, expect: str | None = None):
        if key not in item:
            if required:
                raise self._err(f"{where}.{key}", f"missing required key (expected {expect or _tname(typ)})")
            return default
        val = item[key]
        ok = isinstance(val, typ) and not (typ is not bool and isinstance(val, bool))
        if typ is float and isinstance(val, int) and not isinstance(val, bool):
            ok, val = True, float(val)
        if not ok:
            raise self._err(f"{where}.{key}", f"expected {expect or _tname(typ)}, got {_kind(val)} {val!r}")
        if check is not None and not check(val):
            raise self._err(f"{where}.{key}", f"expected {expect}, got {val!r}")
        return val

    def _unknown(self, item: dict, where: str, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for k in item:
            if k not in allowed:
                raise self._err(f"{where}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def _parse(self, data: dict) -> None:
        top_allowed = {"cluster", "zone", "leaf", "node", "service", *PACKAGE_SECTIONS}
        for k in data:
            if k not in top_allowed:
                raise self._err(k, f"unknown top-level key (allowed: {', '.join(sorted(top_allowed))})")
        cl = self._table(data, "cluster")
        self._unknown(cl, "cluster", {"name", "description", *_RATE_KEYS})
        self.name: str = self._field(cl, "cluster", "name", str, check=_NAME.match, expect="a name of letters, "
                                     "digits, '.', '_' or '-'")
        self.description: str = self._field(cl, "cluster", "description", str, required=False, default="")
        rates = {k: self._rate(cl, "cluster", k) for k in _RATE_KEYS}
        #: the link between two zones' spine layers, Gbit/s (None: unshaped)
        self.interzone_gbps: float | None = rates["interzone_gbps"]

        # zones
        self.zones: dict[str, Zone] = {}
        zones = self._array(data, "zone")
        if not zones:
            raise self._err("zone", "at least one [[zone]] is required")
        for i, z in enumerate(zones):
            where = f"zone[{i}]"
            self._unknown(z, where, {"name", "spines"})
            name = self._field(z, where, "name", str, check=_NAME.match, expect="a name")
            if name in self.zones:
                raise self._err(f"{where}.name", f"duplicate zone name {name!r}")
            sp = z.get("spines", 1)
            if isinstance(sp, int) and not isinstance(sp, bool):
                if sp < 0:
                    raise self._err(f"{where}.spines", f"expected a count >= 0 or a list of names, got {sp}")
                spines = tuple(f"{name}-spine{j}" for j in range(sp))
            elif isinstance(sp, list) and all(isinstance(s, str) for s in sp):
                spines = tuple(sp)
            else:
                raise self._err(f"{where}.spines", f"expected a count or a list of names, got {_kind(sp)}")
            self.zones[name] = Zone(name, spines, i)

        # leaves
        self.leaves: dict[str, Leaf] = {}
        leaves = self._array(data, "leaf")
        if not leaves:
            raise self._err("leaf", "at least one [[leaf]] is required")
        for i, lf in enumerate(leaves):
            where = f"leaf[{i}]"
            name = self._field(lf, where, "name", str, check=_NAME.match, expect="a name")
            if name in self.leaves:
                raise self._err(f"{where}.name", f"duplicate leaf name {name!r}")
            where = f"leaf[{i}] ({name})"
            self._unknown(lf, where, {"name", "zone", "uplink_gbps"})
            zone = self._field(lf, where, "zone", str)
            if zone not in self.zones:
                raise self._err(f"{where}.zone", f"unknown zone {zone!r} (expected one of: "
                                f"{', '.join(self.zones)})")
            uplink = self._rate(lf, where, "uplink_gbps", rates["uplink_gbps"])
            self.leaves[name] = Leaf(name, zone, i, uplink)

        # nodes
        self.nodes: dict[str, Node] = {}
        nodes = self._array(data, "node")
        if not nodes:
            raise self._err("node", "at least one [[node]] is required")
        addresses: dict[str, str] = {}
        for i, nd in enumerate(nodes):
            where = f"node[{i}]"
            name = self._field(nd, where, "name", str, check=_NAME.match,
                               expect="a name of letters, digits, '.', '_' or '-'")
            if name in self.nodes:
                raise self._err(f"{where}.name", f"duplicate node name {name!r}")
            where = f"node[{i}] ({name})"
            self._unknown(nd, where, {"name", "address", "leaf", "gpus", "cpus", "memory_gib", "labels", "nic_gbps"})
            addr = self._field(nd, where, "address", str, check=_valid_address,
                               expect="an IPv4/IPv6 address or a host name")
            if addr in addresses:
                raise self._err(f"{where}.address", f"address {addr} is already used by node {addresses[addr]!r}")
            addresses[addr] = name
            leaf = self._field(nd, where, "leaf", str)
            if leaf not in self.leaves:
                raise self._err(f"{where}.leaf", f"unknown leaf {leaf!r} (expected one of: "
                                f"{_some(self.leaves)})")
            gpus = self._field(nd, where, "gpus", int, required=False, default=0, check=lambda v: v >= 0,
                               expect="an integer >= 0")
            cpus = self._field(nd, where, "cpus", int, required=False, default=1, check=lambda v: v >= 1,
                               expect="an integer >= 1")
            mem = self._field(nd, where, "memory_gib", float, required=False, default=1.0,
                              check=lambda v: v > 0, expect="a number > 0")
            labels = self._field(nd, where, "labels", list, required=False, default=[],
                                 check=lambda v: all(isinstance(x, str) for x in v), expect="a list of strings")
            nic = self._rate(nd, where, "nic_gbps", rates["nic_gbps"])
            self.nodes[name] = Node(name, addr, self.leaves[leaf].zone, leaf, gpus, cpus, mem, i, tuple(labels),
                                    nic)

        # services
        self.services: list[Service] = []
        seen_ports: dict[tuple[str, int], str] = {}
        for i, sv in enumerate(self._array(data, "service")):
            where = f"service[{i}]"
            module = self._field(sv, where, "module", str, check=_MODULE.match, expect="a dotted module name")
            where = f"service[{i}] ({module})"
            port = self._field(sv, where, "port", int, check=lambda v: 0 <= v <= 65535,
                               expect="a TCP port 0..65535 (0: chosen at start)")
            sel = sv.get("nodes", "*")
            if sel == "*":
                names = tuple(self.nodes)
            elif isinstance(sel, list) and all(isinstance(s, str) for s in sel):
                for s in sel:
                    if s not in self.nodes:
                        raise self._err(f"{where}.nodes", f"unknown node {s!r} (expected \"*\" or names of "
                                        f"[[node]] entries: {_some(self.nodes)})")
                if len(set(sel)) != len(sel):
                    raise self._err(f"{where}.nodes", "a node is listed twice")
                names = tuple(sel)
            else:
                raise self._err(f"{where}.nodes", f'expected "*" or a list of node names, got {_kind(sel)}')
            if any(s.module == module for s in self.services):
                raise self._err(f"{where}.module", f"service {module!r} is declared twice")
            if port:
                for n in names:
                    key = (self.nodes[n].address, port)
                    if key in seen_ports:
                        raise self._err(f"{where}.port", f"port {port} on node {n!r} is already used by "
                                        f"{seen_ports[key]!r}")
                    seen_ports[key] = module
            options = {k: v for k, v in sv.items() if k not in ("module", "nodes", "port")}
            self.services.append(Service(module, names, port, options))

        self.sections: dict[str, dict] = {}
        for sec in PACKAGE_SECTIONS:
            if sec in data:
                self.sections[sec] = self._table(data, sec)
        if "security" in self.sections:
            self._security(self.sections["security"])

        # derived indexes
        self._order = sorted(self.nodes.values(),
                             key=lambda n: (self.zones[n.zone].index, self.leaves[n.leaf].index, n.index))
        self._by_address = {n.address: n for n in self.nodes.values()}

    def _rate(self, item: dict, where: str, key: str, default: float | None = None) -> float | None:
        """A link rate in Gbit/s: a number > 0 (at most 100 Tbit/s), or ``default`` when absent."""
        return self._field(item, where, key, float, required=False, default=default,
                           check=lambda v: 0 < v <= 1e5, expect="a link rate in Gbit/s > 0")

    def _security(self, sec: dict) -> None:
        """``[security]``: the cluster key file and the RPC servers' limits (docs/security.md)."""
        self._unknown(sec, "security", SECURITY_KEYS)
        self._field(sec, "security", "key_file", str, required=False, check=bool, expect="a file path")
        self._field(sec, "security", "encrypt", bool, required=False)
        for k in ("idle_timeout", "handshake_timeout"):
            self._field(sec, "security", k, float, required=False, check=lambda v: v > 0,
                        expect="a number of seconds > 0")
        for k in ("max_connections", "max_connections_per_host"):
            self._field(sec, "security", k, int, required=False, check=lambda v: v > 0, expect="an integer > 0")

    # -- queries -------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        """The node called ``name`` (KeyError naming the known nodes otherwise)."""
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"{self.source}: no node {name!r} (known: {_some(self.nodes)})") from None

    def node_by_address(self, address: str) -> Node | None:
        return self._by_address.get(address)

    def zone_of(self, node: str) -> str:
        return self.node(node).zone

    def leaf_of(self, node: str) -> str:
        return self.node(node).leaf

    def nodes_under_leaf(self, leaf: str) -> list[Node]:
        if leaf not in self.leaves:
            raise KeyError(f"{self.source}: no leaf {leaf!r}")
        return [n for n in self._order if n.leaf == leaf]

    def nodes_in_zone(self, zone: str) -> list[Node]:
        if zone not in self.zones:
            raise KeyError(f"{self.source}: no zone {zone!r}")
        return [n for n in self._order if n.zone == zone]

    def distance(self, a: str, b: str) -> int:
        """Links on the shortest path between nodes ``a`` and ``b`` (0, 2, 4 or 6)."""
        na, nb = self.node(a), self.node(b)
        if na.name == nb.name:
            return 0
        if na.leaf == nb.leaf:
            return 2
        if na.zone == nb.zone:
            return 4
        return 6

    def ordered(self, names: Iterable[str] | None = None) -> list[str]:
        """Node names in topology order: zone by zone, leaf by leaf, so neighbours share a leaf."""
        if names is None:
            return [n.name for n in self._order]
        wanted = set(names)
        for n in wanted:
            self.node(n)
        return [n.name for n in self._order if n.name in wanted]

    def service(self, module: str) -> Service | None:
        for s in self.services:
            if s.module == module:
                return s
        return None

    def endpoint(self, module: str, node: str | None = None) -> tuple[str, int]:
        """(address, port) of service ``module`` on ``node`` (default: its first node)."""
        s = self.service(module)
        if s is None:
            raise KeyError(f"{self.source}: no [[service]] with module = {module!r}")
        if node is None:
            node = s.nodes[0]
        if not s.runs_on(node):
            raise KeyError(f"{self.source}: service {module!r} does not run on node {node!r}")
        return self.node(node).address, s.port

    def section(self, name: str) -> dict:
        """A package's own table (``[fs3]``, ``[haiplatform]``...), empty when absent."""
        return self.sections.get(name, {})

    def __repr__(self) -> str:
        return (f"<Cluster {self.name}: {len(self.zones)} zones, {len(self.leaves)} leaves, "
                f"{len(self.nodes)} nodes, {len(self.services)} services>")


def _kind(v: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a float"}.get(type(v), type(v).__name__)


def _tname(t) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
            dict: "a table"}.get(t, t.__name__)


def _some(d: Iterable[str], n: int = 8) -> str:
    items = list(d)
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _valid_address(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return bool(re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$", s))


def load_cluster(path: str | Path) -> Cluster:
    """Load and validate a cluster description file (``ClusterFileError`` names what is wrong)."""
    p = Path(path)
    src = str(path)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise ClusterFileError(src, None, "file not found") from None
    except OSError as exc:
        raise ClusterFileError(src, None, f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ClusterFileError(src, None, f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClusterFileError(src, None, f"invalid TOML: {exc}") from None
    return Cluster(data, src, p.resolve())


def dump_cluster(data: dict | Cluster) -> str:
    """TOML text for a cluster description (a dict in the file's shape, or a Cluster's raw data)."""
    import tomli_w

    raw = data.raw if isinstance(data, Cluster) else data
    return tomli_w.dumps(raw)

"""Helpers the fs3 cluster tests share."""

from __future__ import annotations

from network import RpcClient


def fs3_serving(lc, nodes: int = 3) -> bool:
    """Whether mgmtd of the local cluster ``lc`` knows exactly ``nodes`` storage nodes, each registered
    (a port) and alive, and every member of every chain is serving."""
    with RpcClient(*lc.cluster.endpoint("fs3.mgmtd"), credential=lc.credential, timeout=5) as c:
        st = c.call("mgmtd.status").result
    return (len(st["nodes"]) == nodes and all(n["port"] and n["alive"] for n in st["nodes"].values())
            and all(s == "serving" for ch in st["chains"].values() for _t, s in ch["members"]))

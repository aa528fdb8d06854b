"""The benchmarks' HAI-Platform: the local description's platform services (no fs3) on free ports."""

from __future__ import annotations

import contextlib
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import tomli_w

LOCAL = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"


@contextlib.contextmanager
def platform_cluster(work: Path, nodes: int = 4) -> Iterator[tuple]:
    """Start the platform under ``work``; yield (LocalCluster, API URL, admin token) once ``nodes``
    agents are up; stop it afterwards."""
    from deploy.local import LocalCluster
    from haiplatform.client import HaiClient

    raw = tomllib.loads(LOCAL.read_text())
    raw["service"] = [s for s in raw["service"] if s["module"].startswith("haiplatform.")]
    work.mkdir(parents=True, exist_ok=True)
    cfile = work / "cluster.toml"
    cfile.write_text(tomli_w.dumps(raw))
    lc = LocalCluster(cfile, work / "run", ports="auto")
    lc.up()
    try:
        addr, port = lc.cluster.endpoint("haiplatform.api")
        url, tok = f"http://{addr}:{port}", (lc.run_dir / "hai" / "admin.token").read_text().strip()
        with HaiClient(url, tok, timeout=30) as c:
            deadline = time.monotonic() + 30
            while len([x for x in c.nodes() if x["state"] == "up"]) < nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{nodes} agents did not register within 30 s")
                time.sleep(0.05)
        yield lc, url, tok
    finally:
        lc.down()

"""Helpers of the HAI-Platform tests that run the local cluster."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import tomli_w

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"


def cluster_file_factory(tmp_path: Path) -> Callable[..., Path]:
    """A factory of cluster files: local.toml with [haiplatform] keys overridden (a short heartbeat
    timeout, a db_url, ...) and only the platform's services (no fs3), one new file per call."""
    def make(**hai) -> Path:
        raw = tomllib.loads(LOCAL_CLUSTER.read_text())
        raw["haiplatform"] = {**raw.get("haiplatform", {}), **hai}
        raw["service"] = [s for s in raw["service"] if s["module"].startswith("haiplatform.")]
        p = tmp_path / f"cluster-{len(list(tmp_path.glob('cluster-*.toml')))}.toml"
        p.write_text(tomli_w.dumps(raw))
        return p
    return make

"""Helpers of the HAI-Platform tests that run the local cluster."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"


def cluster_file_factory(tmp_path: Path) -> Callable[..., Path]:
    """A factory of cluster files: local.toml with [haiplatform] keys overridden (a short heartbeat
    timeout, a db_url, ...) and only the platform's services (no fs3), one new file per call."""
    def make(**hai) -> Path:
        from deploy import local

        if local.netns_by_default() and str(hai.get("db_url", "")).startswith("postgresql"):
            # the nodes' namespaces reach the host through the fabric only, not its 127.0.0.1
            pytest.skip("--netns: the nodes' namespaces cannot reach the test's PostgreSQL on the host's loopback")
        raw = tomllib.loads(LOCAL_CLUSTER.read_text())
        raw["haiplatform"] = {**raw.get("haiplatform", {}), **hai}
        raw["service"] = [s for s in raw["service"] if s["module"].startswith("haiplatform.")]
        p = tmp_path / f"cluster-{len(list(tmp_path.glob('cluster-*.toml')))}.toml"
        p.write_text(tomli_w.dumps(raw))
        return p
    return make


@contextlib.contextmanager
def api_client(db, tmp_path: Path, **cfg) -> Iterator:
    """The API in-process over ``db`` (bootstrapped: admin token "admin-tok", cluster secret
    "cluster-secret", ``cfg`` overriding HaiConfig's fields): a TestClient that speaks as the admin."""
    from fastapi.testclient import TestClient

    from haiplatform.api import bootstrap, create_app
    from haiplatform.config import HaiConfig
    from network import load_cluster

    conf = HaiConfig(state_dir=tmp_path / "state", admin_token="admin-tok", cluster_secret="cluster-secret", **cfg)
    conf.state_dir.mkdir()
    bootstrap(conf, db)
    with TestClient(create_app(load_cluster(LOCAL_CLUSTER), conf, db)) as c:
        c.headers["Authorization"] = "Bearer admin-tok"
        yield c

"""systemd units (`hai cluster units`): what they say, and that systemd accepts them."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.units import TARGET, UnitOptions, UnitsError, unit_name, units_for, write_units
from network import load_cluster

ROOT = Path(__file__).resolve().parent.parent
LOCAL = load_cluster(ROOT / "deploy" / "clusters" / "local.toml")
# systemd < 254 does not know these two (the doubling back-off); it says so and ignores them
_NEWER_KEYS = ("RestartSteps", "RestartMaxDelaySec")


def _parse(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    cp.optionxform = str  # keys are case-sensitive
    cp.read_string(text)
    return cp


def test_units_of_a_node_say_what_the_launcher_does():
    files = units_for(LOCAL, "n0", UnitOptions(prefix="/opt/ff/.venv"))
    mods = [s.module for s in LOCAL.services if s.runs_on("n0")]
    assert set(files) == {*(unit_name(m) for m in mods), TARGET, "fireflyer.env"}
    assert {"fs3.mgmtd", "fs3.meta", "haiplatform.api", "haiplatform.agent"} <= set(mods)
    meta = _parse(files["fireflyer-fs3-meta.service"])
    assert meta["Service"]["ExecStart"] == ("/opt/ff/.venv/bin/python -m fs3.meta --cluster /etc/fireflyer/cluster.toml"
                                            " --node n0")
    assert (meta["Service"]["Restart"], meta["Service"]["RestartSec"]) == ("on-failure", "0.5s")
    assert (meta["Unit"]["StartLimitBurst"], meta["Unit"]["StartLimitIntervalSec"]) == ("5", "120s")
    assert meta["Service"]["RestartMaxDelaySec"] == "30s"
    assert (meta["Service"]["User"], meta["Service"]["Group"]) == ("fireflyer", "fireflyer")
    assert meta["Service"]["NoNewPrivileges"] == "yes" and meta["Service"]["ProtectSystem"] == "strict"
    assert meta["Service"]["EnvironmentFile"] == "/etc/fireflyer/fireflyer.env"
    assert "MemoryMax" in meta["Service"] and "LimitNOFILE" in meta["Service"]
    # dependency order: the metadata service after the probe and the cluster manager, not after the API
    after = meta["Unit"]["After"].split()
    assert after[0] == "network-online.target" and "fireflyer-fs3-mgmtd.service" in after
    assert "fireflyer-haiplatform-api.service" not in after
    agent = _parse(files["fireflyer-haiplatform-agent.service"])["Service"]
    assert agent["User"] == "root" and agent["KillMode"] == "mixed"
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "PrivateDevices", "MemoryMax"):
        assert hardening not in agent  # it starts jobs as their users, with their devices and /tmp
    target = _parse(files[TARGET])["Unit"]
    wants = target["Wants"].split()
    assert sorted(wants) == sorted(unit_name(m) for m in mods)
    order = [unit_name(m) for m in ("fs3.mgmtd", "fs3.meta", "haiplatform.api", "haiplatform.agent")]
    assert [w for w in wants if w in order] == order  # the launcher's start order
    assert agent_after_all(files)
    assert "FIREFLYER_RUN_DIR_CLUSTER=/var/lib/fireflyer" in files["fireflyer.env"]
    # storage nodes: no API there; a [[service]] restart override reaches the unit
    raw = dict(LOCAL.raw)
    raw["service"] = [dict(s, restart_sec=2.0, start_limit_burst=3) if s["module"] == "fs3.storage" else s
                      for s in LOCAL.raw["service"]]
    from network.topology import Cluster

    st = _parse(units_for(Cluster(raw), "n1")["fireflyer-fs3-storage.service"])
    assert st["Service"]["RestartSec"] == "2s" and st["Unit"]["StartLimitBurst"] == "3"
    assert "fireflyer-haiplatform-api.service" not in units_for(LOCAL, "n1")


def agent_after_all(files: dict[str, str]) -> bool:
    after = set(_parse(files["fireflyer-haiplatform-agent.service"])["Unit"]["After"].split())
    return {unit_name(m) for m in ("fs3.mgmtd", "haiplatform.api", "haiplatform.scheduler")} <= after


def test_bad_input_is_named():
    with pytest.raises(UnitsError, match=r"no node 'n9'; its nodes: n0, n1, n2, n3"):
        units_for(LOCAL, "n9")
    with pytest.raises(UnitsError, match="user 'Bad User'"):
        units_for(LOCAL, "n0", UnitOptions(user="Bad User"))
    with pytest.raises(UnitsError, match="prefix 'venv' must be an absolute path"):
        units_for(LOCAL, "n0", UnitOptions(prefix="venv"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_every_node_of_the_local_cluster_passes_systemd_analyze_verify(tmp_path):
    env_dir = tmp_path / "etc"
    for node in LOCAL.ordered():
        out = tmp_path / node
        # ExecStart must exist for verify: this Python; the env file where the units look for it
        write_units(LOCAL, node, out, UnitOptions(python=sys.executable, env_file=str(env_dir / "fireflyer.env"),
                                                  cluster_file=str(tmp_path / "cluster.toml")))
        env_dir.mkdir(exist_ok=True)
        shutil.copy(out / "fireflyer.env", env_dir / "fireflyer.env")
        units = sorted(str(p) for p in out.iterdir() if p.suffix in (".service", ".target"))
        r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
        problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                    if ln.strip() and not any(f"Unknown key '{k}'" in ln or f"Unknown key name '{k}'" in ln
                                               for k in _NEWER_KEYS)]
        assert r.returncode == 0 and problems == [], f"{node}: {problems or r.stderr}"


def test_cli_writes_the_units(tmp_path):
    r = subprocess.run([sys.executable, "-m", "haiplatform.cli", "cluster", "units", "--cluster",
                        str(ROOT / "deploy" / "clusters" / "local.toml"), "--node", "n2", "--out", str(tmp_path / "u"),
                        "--user", "ff", "--prefix", "/srv/ff/venv"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    st = _parse((tmp_path / "u" / "fireflyer-fs3-storage.service").read_text())["Service"]
    assert st["User"] == "ff" and st["ExecStart"].startswith("/srv/ff/venv/bin/python -m fs3.storage ")
    assert str(tmp_path / "u" / TARGET) in r.stdout
    r = subprocess.run([sys.executable, "-m", "haiplatform.cli", "cluster", "units", "--cluster",
                        str(ROOT / "deploy" / "clusters" / "local.toml"), "--node", "zz", "--out", str(tmp_path / "v")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "no node 'zz'" in r.stderr


def test_units_are_written_only_into_a_private_directory(tmp_path):
    # a directory another account could write (or made by one, or a link to one): refused, nothing written
    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / TARGET).symlink_to(victim)
    with pytest.raises(UnitsError, match="writable by other accounts"):
        write_units(LOCAL, "n1", shared)
    (tmp_path / "link").symlink_to(shared)
    with pytest.raises(UnitsError, match="not a directory of its own"):
        write_units(LOCAL, "n1", tmp_path / "link")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(UnitsError, match="owned by uid 65534"):
            write_units(LOCAL, "n1", theirs)
    assert victim.read_text() == "secret\n" and victim.stat().st_mode & 0o777 == 0o600
    # a new path is made 0700; a link left in one's own directory is replaced, its target untouched
    out = tmp_path / "new" / "units"
    write_units(LOCAL, "n1", out)
    assert out.stat().st_mode & 0o777 == 0o700
    (out / TARGET).unlink()
    (out / TARGET).symlink_to(victim)
    files = write_units(LOCAL, "n1", out)
    assert not (out / TARGET).is_symlink() and victim.read_text() == "secret\n"
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)

"""deploy/replicas (systemd on several hosts) and deploy/kubernetes: the files parse and
fit together (volumes, selectors, the config batchd reads)."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path
from typing import Any

import yaml

from batchd import config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes" / "batchd.yaml"
REPLICAS = ROOT / "deploy" / "replicas"


def _docs() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def test_kubernetes_example_fits_together(tmp_path: Path) -> None:
    k = _docs()
    assert set(k) == {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    }
    pvc, dep, pdb = k["PersistentVolumeClaim"], k["Deployment"], k["PodDisruptionBudget"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < spec["replicas"]
    pod = spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    [container] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    cfg = config.parse(tomllib.loads(k["ConfigMap"]["data"]["config.toml"]), tmp_path, env={})
    assert str(cfg.spool.dir) == mounts["spool"]
    assert cfg.state.url is not None and cfg.state.url.startswith("postgresql://")
    env = {e["name"] for e in container["env"]}
    assert {"PGPASSWORD", cfg.api.api_key_env} <= env
    assert pod["terminationGracePeriodSeconds"] > cfg.daemon.shutdown_grace_seconds


def test_systemd_replicas_example(tmp_path: Path) -> None:
    cfg = config.parse(tomllib.loads((REPLICAS / "config.toml").read_text()), tmp_path, env={})
    assert cfg.state.url is not None
    drop_in = configparser.ConfigParser(strict=False, interpolation=None)
    drop_in.optionxform = str  # type: ignore[assignment,method-assign]
    drop_in.read(REPLICAS / "batchd.service.d" / "replicas.conf")
    mount = drop_in["Unit"]["RequiresMountsFor"]
    assert str(cfg.spool.dir).startswith(mount)
    assert drop_in["Service"]["ReadWritePaths"] == mount
    assert "PGPASSFILE" in drop_in["Service"]["Environment"]

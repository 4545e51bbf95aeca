"""The cluster and deployment definitions parse, and every deployment entrypoint is a real flow."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import Flow

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_kuberay_cluster_has_gpu_worker_group():
    cluster = yaml.safe_load((INFRA / "ray" / "kuberay-raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1


def test_ray_up_config_has_gpu_node_type():
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    assert "gpu" in config["available_node_types"]


def test_prefect_yaml_entrypoints_are_flows():
    project = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert project["deployments"]
    for deployment in project["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties), deployment["name"]

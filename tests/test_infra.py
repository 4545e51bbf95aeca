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


def _project_deployments() -> list[tuple[dict, Flow]]:
    project = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    found = []
    for deployment in project["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        found.append((deployment, getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)))
    return found


def test_prefect_yaml_deploys_every_served_flow_on_the_process_pool():
    """`prefect deploy --all` must give the cluster the same flows that `lvd serve` gives this machine."""
    from flows.serve import all_deployments

    project = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    served = {deployment.flow_name for deployment in all_deployments()}
    deployed = {flow.name for _, flow in _project_deployments()}
    assert deployed == served
    assert {"curate-lvd", "train-stage", "evaluate-fvd", "generate-video", "generate-walk", "lvd-pipeline"} <= deployed
    names = [(flow.name, deployment["name"]) for deployment, flow in _project_deployments()]
    assert len(names) == len(set(names)), "two deployments with the same FLOW/NAME"
    pools = project["definitions"]["work_pool"]["name"]
    assert all(deployment["work_pool"]["name"] == pools for deployment in project["deployments"])


def test_prefect_yaml_settings_are_valid_for_their_flows():
    """Nested settings (curation config, FVD/generate overrides) are checked the way the flows check them."""
    from curation.config import CurationConfig
    from flows.pipeline import check_overrides

    for deployment, _ in _project_deployments():
        parameters = deployment.get("parameters", {})
        for key in ("config", "curate_config"):
            if key in parameters:
                CurationConfig.from_overrides(parameters[key]).scorers.validate()
        for key, target in (("fvd", "flows.evaluate:evaluate_fvd"), ("generate", "flows.generate:generate_video")):
            if key in parameters:
                module, name = target.split(":")
                allowed = set(getattr(importlib.import_module(module), name).parameters.properties)
                check_overrides(key, parameters[key], allowed)
        if "ray_address" in parameters:
            assert parameters["ray_address"].startswith("ray://"), deployment["name"]


def test_dockerfile_builds_the_runtime_from_the_repository():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    root = INFRA.parent
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (root / source).exists(), f"Dockerfile copies missing {source}"
    assert "pip install" in dockerfile and "opencv-python-headless" in dockerfile

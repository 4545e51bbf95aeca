"""The cluster and deployment definitions parse, and every deployment entrypoint is a real flow."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import pytest
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
    from common.requests import build
    from curation.config import CurationConfig
    from flows.pipeline import FvdOverrides, GenerateOverrides

    for deployment, _ in _project_deployments():
        parameters = deployment.get("parameters", {})
        for key in ("config", "curate_config"):
            if key in parameters:
                CurationConfig.from_overrides(parameters[key])  # every section checks itself when built
        for key, section in (("fvd", FvdOverrides), ("generate", GenerateOverrides)):
            if key in parameters:
                assert build(section, parameters[key], name=key).given(), deployment["name"]
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


_RAY_PROBE = r"""
import json, os, re, sys, time
import psutil
import ray
from infra.local import ray_init_kwargs

ray.init(**ray_init_kwargs(num_cpus=1))
# The raylet logs every worker process it starts. Workers started ahead of work are started when the driver
# registers with the raylet, which precedes the job's start notification from the GCS ("Job ... already started
# in worker pool"): the log up to that line holds every worker started before any work was submitted.
raylet_log = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "raylet.out")
deadline, before_work = time.monotonic() + 120, None
while before_work is None:
    assert time.monotonic() < deadline, "the raylet logged no start of this job within 120 s"
    with open(raylet_log, errors="replace") as log:
        text = log.read()
    marker = re.search(r"Job \w+ already started in worker pool", text)
    if marker is None:
        time.sleep(0.1)
    else:
        before_work = text[:marker.start()]
started_before_work = [int(pid) for pid in re.findall(r"Started worker process with pid (\d+)", before_work)]
idle = []
for child in psutil.Process().children(recursive=True):
    try:
        if " ".join(child.cmdline()).startswith("ray::IDLE"):
            idle.append(child.pid)
    except psutil.Error:
        pass

@ray.remote
class Echo:
    def pid(self):
        return os.getpid()

@ray.remote
def task_pid():
    return os.getpid()

actor = Echo.remote()
worker_pids = {ray.get(actor.pid.remote()), ray.get(task_pid.remote())}
own = {os.getpid(), *worker_pids} | {child.pid for child in psutil.Process().children(recursive=True)}
listening = [(conn.laddr.ip, conn.laddr.port, conn.pid) for conn in psutil.net_connections(kind="inet")
             if conn.status == psutil.CONN_LISTEN and conn.pid in own]
print("PROBE " + json.dumps({"listening": listening, "workers": sorted(worker_pids), "processes": len(own),
                            "idle_before_work": idle,
                            "started_before_work": started_before_work}))
ray.shutdown()
"""


def _run_ray_probe(env_updates: dict[str, str]) -> dict:
    """Start the project's local Ray in a fresh interpreter (clean Ray state) and report its listening sockets."""
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({"PYTHONPATH": str(INFRA.parent), "RAY_TMPDIR": _short_temp_dir(), **env_updates})
    result = subprocess.run([sys.executable, "-c", _RAY_PROBE], env=env, capture_output=True, text=True,
                            timeout=240, cwd=INFRA.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def _is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _short_temp_dir() -> str:
    """A fresh Ray temp dir with a short path (Ray's unix socket paths live under it)."""
    import tempfile

    return tempfile.mkdtemp(prefix="rt", dir="/tmp")


@pytest.fixture(scope="module")
def local_ray_probe() -> dict:
    return _run_ray_probe({})


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_local_ray_listens_on_loopback_only(local_ray_probe):
    """A local run's Ray (GCS, raylet, object manager, task and actor workers, agents) accepts no connection
    from the network."""
    probe = local_ray_probe
    assert probe["listening"], "the probe saw no listening socket at all: it did not look at Ray's processes"
    exposed = [entry for entry in probe["listening"] if not _is_loopback(entry[0])]
    assert not exposed, f"Ray processes listen beyond loopback: {exposed}"


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_a_local_ray_starts_a_worker_only_for_work(local_ray_probe):
    """No worker process waits idle before the first task (`LOCAL_RAY_ENV`): on a small machine idle workers
    and metrics collection took 5.3 CPU-seconds a minute of an idle local Ray, 3.0 without them."""
    assert local_ray_probe["started_before_work"] == []
    assert local_ray_probe["idle_before_work"] == []
    assert len(local_ray_probe["workers"]) == 2  # the actor and the task still got theirs


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_local_ray_is_not_hijacked_by_another_cluster_on_the_machine():
    """A dead `ray start` cluster's address file does not make a local run join (or fail to join) that cluster:
    without `ray_address` the run starts its own Ray (with address "local", which Ray documents as also
    ignoring RAY_ADDRESS)."""
    ray_tmp = Path(_short_temp_dir())
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # recorded by `ray start`, long dead
    assert _run_ray_probe({"RAY_TMPDIR": str(ray_tmp)})["workers"]


def test_ray_init_kwargs_join_exactly_the_given_cluster():
    from infra.local import ray_init_kwargs

    kwargs = ray_init_kwargs("ray://head:10001")
    assert kwargs["address"] == "ray://head:10001"
    assert not {"num_cpus", "_node_ip_address", "object_store_memory"} & set(kwargs)
    assert ray_init_kwargs()["address"] == "local"


def test_cluster_configs_need_a_token_and_keep_the_dashboard_off_the_network():
    """Neither cluster config opens the dashboard beyond loopback, and both turn on Ray's token authentication."""
    kuberay = yaml.safe_load((INFRA / "ray" / "kuberay-raycluster.yaml").read_text())
    assert kuberay["spec"]["authOptions"]["mode"] == "token"
    for group in [kuberay["spec"]["headGroupSpec"], *kuberay["spec"]["workerGroupSpecs"]]:
        assert "dashboard-host" not in group["rayStartParams"], group.get("groupName", "head")
        ports = [port["containerPort"] for c in group["template"]["spec"]["containers"] for port in c.get("ports", [])]
        assert 8265 not in ports
    ray_up = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    starts = [cmd for cmd in ray_up["head_start_ray_commands"] + ray_up["worker_start_ray_commands"]
              if "ray start" in cmd]
    assert starts and all("RAY_AUTH_MODE=token" in cmd and "dashboard-host" not in cmd for cmd in starts)
    assert "~/.ray/auth_token" in ray_up["file_mounts"]


def test_both_cluster_configs_name_the_same_worker_groups():
    """The README, the cost model and the sizing notes speak of `cpu-decode` and `gpu`: both configs use those names."""
    kuberay = yaml.safe_load((INFRA / "ray" / "kuberay-raycluster.yaml").read_text())
    ray_up = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    groups = {group["groupName"] for group in kuberay["spec"]["workerGroupSpecs"]}
    node_types = set(ray_up["available_node_types"]) - {ray_up["head_node_type"]}
    assert groups == node_types == {"cpu-decode", "gpu"}


_WATCHER = r"""
import json, subprocess, sys, time
from infra.driver import DriverProcess, stop_with_driver

child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
stop_with_driver(DriverProcess.from_dict(json.loads(sys.argv[1])))
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_worker_exits_with_its_child_processes_once_its_driver_is_gone():
    """stop_with_driver (what each curate-batch task calls on its Ray worker): the worker follows a driver
    that exits, children included; a driver on another machine is never taken for gone."""
    import dataclasses
    import json
    import subprocess
    import sys
    import time

    import psutil

    from infra.driver import DriverProcess

    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    identity = dataclasses.replace(DriverProcess.current(), pid=driver.pid,
                                   started=psutil.Process(driver.pid).create_time())
    assert not identity.is_gone()
    assert not dataclasses.replace(identity, host="another-machine", pid=2**22 + 1).is_gone()
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, json.dumps(identity.to_dict())],
                               cwd=INFRA.parent, stdout=subprocess.PIPE, text=True)
    child_pid = int(watcher.stdout.readline())
    try:
        assert watcher.poll() is None
        driver.kill()
        driver.wait()
        assert identity.is_gone()
        assert watcher.wait(timeout=120) == 1
        deadline = time.monotonic() + 120
        while psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the worker's child process outlived it"
            time.sleep(0.05)
    finally:
        for process in (driver, watcher):
            if process.poll() is None:
                process.kill()
        with contextlib.suppress(psutil.Error):
            psutil.Process(child_pid).kill()


_FLOW_THEN_STOP_SERVER = """
import os, sys
from pathlib import Path
from prefect import flow, get_run_logger
from prefect.settings import PREFECT_API_URL, temporary_settings
from infra.local import api_port, local_prefect_server, prefect_server_env

@flow(persist_result=False)
def fails() -> None:
    get_run_logger().info("one line")
    raise ValueError("bad parameter")

home = Path(sys.argv[1])
with local_prefect_server(home) as url:
    os.environ.update(prefect_server_env(home, api_port(url)))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        try:
            fails()
        except ValueError:
            pass
print("left the server", flush=True)
"""


@pytest.mark.slow  # end to end (CLI subprocesses or a Ray start): left out of make test-fast
def test_stopping_the_local_server_first_sends_what_the_process_still_queues(tmp_path):
    """`local_prefect_server` drains the process's Prefect log and event workers before it stops the server:
    otherwise the events and logs of the last flow run are retried against the stopped server at exit (each
    pytest process of the suite waited ~75 s for that) and then lost."""
    import subprocess
    import sys

    script = tmp_path / "flow_then_stop.py"
    script.write_text(_FLOW_THEN_STOP_SERVER)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "home")], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "left the server" in output, output[-3000:]
    for lost in ("pending items", "Error logging to API", "Unable to connect"):
        assert lost not in output, output[-3000:]

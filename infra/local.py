"""Local stand-ins for the cluster services: a Prefect server on loopback (SQLite) and a local Ray.

Tests, `lvd serve` and `lvd demo` all start their services through these helpers, so the embedded
defaults live in one place. On a real cluster neither is used: PREFECT_API_URL points at the team's
server and `ray_address` at the cluster (`ray://head:10001`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
}
# Ray's authentication stays at Ray's default (a token in ~/.ray/auth_token for a new local cluster): the local
# Ray is on loopback, and the token also keeps other users of this machine from submitting tasks into it.

# Ray's switch for "this node is a single-machine cluster": its node address becomes 127.0.0.1, so GCS, raylet,
# object manager, workers and agents bind to loopback only. Without it Ray turns a node IP of 127.0.0.1 into the
# machine's network address and listens on every interface.
_RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# With no Prefect server configured, a flow run reports to a temporary server Prefect starts in its own process;
# Prefect gives it 20 s to answer, which a loaded machine misses (the run then fails before it starts).
EPHEMERAL_SERVER_ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def apply_quiet_env() -> None:
    """No telemetry: this machine (and many clusters) has no outbound network. Also a patient temporary server."""
    for key, value in {**QUIET_ENV, **EPHEMERAL_SERVER_ENV}.items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 90.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process exited with code {process.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def prefect_server_env(home: Path, port: int) -> dict[str, str]:
    """Environment that makes Prefect clients and the server use `home` (SQLite) on loopback:`port`."""
    home = Path(home).resolve()
    return {
        **QUIET_ENV,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
    }


# The local server's credentials and the settings a Prefect client needs to reach it, both under the server's
# home and readable by its owner only.
API_AUTH_FILE = "api-auth"
CLIENT_ENV_FILE = "client.env"


def api_auth_string(home: Path) -> str:
    """The local server's basic-auth string `lvd:TOKEN`: generated once (a random 256-bit token) into
    HOME/api-auth with mode 0600, then read from there. A file others can read is refused, not used."""
    import secrets

    path = Path(home) / API_AUTH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"lvd:{secrets.token_urlsafe(32)}\n")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}` or delete it")
    text = path.read_text().strip()
    if ":" not in text:
        raise ValueError(f"{path} is not an auth string USER:TOKEN; delete it to make a new one")
    return text


def write_client_env(home: Path, client_env: dict[str, str]) -> Path:
    """HOME/client.env (mode 0600): the Prefect client settings of the local server, for a shell of the same user:
    `set -a; . HOME/client.env; set +a` then `prefect deployment run ...`."""
    path = Path(home) / CLIENT_ENV_FILE
    descriptor = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file keeps its mode through O_TRUNC
    with os.fdopen(descriptor, "w") as handle:
        handle.writelines(f"{name}={value}\n" for name, value in client_env.items())
    return path


@contextlib.contextmanager
def local_prefect_api(home: Path, auth: bool = True) -> Iterator[dict[str, str]]:
    """A local Prefect server (with the auth string of `api_auth_string` unless `auth` is False) that this process
    and the processes it starts use: yields the client settings (PREFECT_API_URL, PREFECT_API_AUTH_STRING), which
    are also in os.environ, Prefect's settings and HOME/client.env while it runs."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    home = Path(home)
    auth_string = api_auth_string(home) if auth else None
    with local_prefect_server(home, auth_string=auth_string) as api_url:
        client_env = {"PREFECT_API_URL": api_url, **({"PREFECT_API_AUTH_STRING": auth_string} if auth_string else {})}
        updates = {PREFECT_API_URL: api_url, **({PREFECT_API_AUTH_STRING: auth_string} if auth_string else {})}
        saved = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
        os.environ.update(client_env)
        if not auth_string:
            os.environ.pop("PREFECT_API_AUTH_STRING", None)
        write_client_env(home, client_env)
        try:
            with temporary_settings(updates=updates):
                yield client_env
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def start_logged(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` in a session of its own (stopped with its children by `os.killpg(process.pid, ...)`), its
    output appended to `log_path` (folder made): the child holds the log open, this process does not."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def local_prefect_server(home: Path, port: int | None = None, log_path: Path | None = None,
                         auth_string: str | None = None) -> Iterator[str]:
    """Start `prefect server start` on 127.0.0.1 with a SQLite database under `home`; yield its API URL.

    With `auth_string` (USER:PASSWORD) every API call but the health check needs it (HTTP basic auth; Prefect
    clients send PREFECT_API_AUTH_STRING). The server is stopped (and its children with it) when the context
    exits, after this process has sent the logs and events it still holds: sent later, to a stopped server, they
    hold up the interpreter's exit by over a minute of connection retries.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, **prefect_server_env(home, port)}
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    process = start_logged([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                            str(port)], log_path or home / "server.log", env=env)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(f"{api_url}/health", process=process)
        yield api_url
    finally:
        drain_prefect_clients()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def api_port(api_url: str) -> int:
    """The port of a server's API URL, such as `local_prefect_server` yields (http://127.0.0.1:PORT/api)."""
    port = urlsplit(api_url).port
    if port is None:
        raise ValueError(f"no port in API URL {api_url!r}")
    return port


def drain_prefect_clients(timeout_s: float = 15.0) -> None:
    """Send what this process's Prefect log and event workers still queue (no-op if Prefect is not loaded)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s, at_exit=False)


def unconfigured_prefect_api_url() -> str | None:
    """Inside a flow run with no Prefect API configured: the URL of the temporary server Prefect started in this
    process (on 127.0.0.1) that the run reports to, for Ray workers to report to as well. None otherwise (a
    configured URL already reaches the workers with the run's settings).

    Lives here, not in a flow module: a function of a flow module that a flow calls is pickled by reference into
    the Ray tasks' context, and a deployment loads flow modules under names workers cannot import."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    context = FlowRunContext.get()
    if PREFECT_API_URL.value() or context is None or context.client is None:
        return None
    return str(context.client.api_url).rstrip("/")


def _ray_on_loopback(single_node: bool) -> None:
    """Make the next `ray.init` in this process pick 127.0.0.1 (single_node) or the network address as node IP.

    Ray reads the switch into a constant when it is first imported, so an already imported Ray is updated too;
    the environment variable carries the choice to the processes the local Ray starts.
    """
    if single_node:
        os.environ[_RAY_SINGLE_NODE_ENV] = "0"
    elif os.environ.get(_RAY_SINGLE_NODE_ENV) == "0":
        del os.environ[_RAY_SINGLE_NODE_ENV]
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = not single_node


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost")


def current_ray_node_id() -> str | None:
    """The Ray node this code runs on (hex id), or None outside Ray (a sequential run imports no Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


# A Ray of one machine, started by `ray_init_kwargs` or `local_ray_cluster`, without what only a cluster needs:
# - Ray Train's preemption watcher (one more actor process per training run, polling every 5 s) watches for nodes
#   being drained, which a Ray of one machine never does;
# - metrics collection feeds a dashboard and Prometheus that a local Ray does not run;
# - workers started ahead of the first task wait idle, and poll, as long as the Ray runs (an idle local Ray took
#   5.3 CPU-seconds a minute with both, 3.0 without); a task or actor starts its worker when it needs one.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_enable_metrics_collection": "0",
                 "RAY_prestart_worker_first_driver": "0"}


def ray_init_kwargs(address: str | None = None, num_cpus: int | None = None) -> dict:
    """Arguments for `ray.init`: join exactly `address` (a cluster), or start an own local Ray on loopback.

    Without an address the run never joins another cluster on this machine: not one from `ray start` (live, or
    dead with its address file left behind in Ray's temp dir), nor one named by RAY_ADDRESS. Its processes
    listen on 127.0.0.1 only, and it has no dashboard.
    """
    apply_quiet_env()
    if address:
        # a cluster on this machine (`local_ray_cluster`) keeps 127.0.0.1: this driver must find its node there
        _ray_on_loopback(_is_loopback(address))
        _default_to_token_auth()
        return {"address": address, "ignore_reinit_error": True}
    _ray_on_loopback(True)
    for key, value in LOCAL_RAY_ENV.items():  # the local Ray's processes inherit these
        os.environ.setdefault(key, value)
    return {
        "address": "local",
        "_node_ip_address": "127.0.0.1",
        "num_cpus": num_cpus or os.cpu_count() or 1,
        "include_dashboard": False,
        "ignore_reinit_error": True,
        "object_store_memory": 256 * 1024 * 1024,
        "log_to_driver": True,
    }


class RayConnectionError(ConnectionError):
    """This driver cannot join the Ray cluster at an address; the message is one line saying what to do."""


_RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
# Ray's GCS client in a child process, authenticated as `ray.init` would be in this environment.
_GCS_PROBE = """
import sys
from ray._private.authentication import authentication_token_setup as auth
auth.ensure_token_if_auth_enabled(None, create_token_if_missing=False)
import json
from collections import Counter
from ray._raylet import GcsClient
total = Counter()
for info in GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values():
    if info.state == 0:  # ALIVE
        total.update(dict(info.resources_total))
print("RESOURCES " + json.dumps(total))
"""


# clusters that accepted this process's authentication: {address: their total resources when probed}
_JOINED_ADDRESSES: dict[str, dict[str, float]] = {}


def _default_to_token_auth() -> None:
    """A driver joining a cluster authenticates with its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) when it has one and RAY_AUTH_MODE is unset: `ray start` turns token authentication on by
    default, and a token-mode driver also joins a cluster that has it off. Ray reads the mode when it is imported,
    so it is switched through Ray's own call, which also updates the running process (and, through the
    environment, the processes it starts)."""
    if os.environ.get(_RAY_AUTH_MODE_ENV) is not None:
        return
    import logging

    from ray._private.authentication import authentication_token_setup as auth

    quiet = logging.getLogger(auth.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning speaks of starting a cluster, which a driver does not
    try:
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def check_ray_connection(address: str | None, timeout_s: float = 120.0) -> None:
    """Raise RayConnectionError (one line) unless the cluster at `address` (host:port of its GCS) accepts this
    driver. Probed in a child process that keeps Ray's own output, so a refused token is one line instead of
    twenty GCS retry warnings and a traceback. Ray Client addresses (ray://) and local runs are not probed."""
    if not address or address.startswith("ray://") or address in ("local", "auto") or address in _JOINED_ADDRESSES:
        return
    _default_to_token_auth()
    try:
        probe = subprocess.run([sys.executable, "-c", _GCS_PROBE, address], capture_output=True, text=True,
                               timeout=timeout_s, env={**os.environ, **QUIET_ENV})
    except subprocess.TimeoutExpired:
        raise RayConnectionError(f"no Ray cluster answered at {address} within {timeout_s:.0f} s") from None
    if probe.returncode == 0:
        # `lvd train` checks before its flow starts, the flow's first task again
        line = next((line for line in probe.stdout.splitlines() if line.startswith("RESOURCES ")), "RESOURCES {}")
        _JOINED_ADDRESSES[address] = json.loads(line.removeprefix("RESOURCES "))
        return
    output = probe.stderr + probe.stdout
    if "InvalidAuthToken" in output or "AuthenticationError" in output or "auth token" in output.lower():
        mode = os.environ.get(_RAY_AUTH_MODE_ENV)
        hint = ("set RAY_AUTH_MODE=token" if mode != "token" else
                "give this driver the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        raise RayConnectionError(f"the Ray cluster at {address} refused this driver's authentication "
                                 f"(RAY_AUTH_MODE={mode}): {hint}; the cluster's token is in ~/.ray/auth_token "
                                 "on its head node")
    last = next((line for line in reversed(output.strip().splitlines()) if line.strip()), "no output")
    raise RayConnectionError(f"cannot join the Ray cluster at {address}: {last.strip()[:300]}")


def ray_cluster_resources(address: str | None, timeout_s: float = 120.0) -> dict[str, float] | None:
    """The total resources ({"CPU": 4.0, "GPU": 1.0, ...}) of the alive nodes of the cluster at `address` (host:port
    of its GCS), read by `check_ray_connection`'s probe (no driver connection: a process joins one Ray at a time).
    None where there is nothing to probe: a local run (its Ray is not started yet) or a Ray Client address
    (ray://, no GCS to reach). RayConnectionError (one line) when the cluster cannot be joined."""
    if not address or address.startswith("ray://") or address in ("local", "auto"):
        return None
    check_ray_connection(address, timeout_s)
    return dict(_JOINED_ADDRESSES[address])


# --- a multi-node Ray cluster on one machine ----------------------------------------------------------------------


@dataclass
class LocalRayNode:
    """One `ray start` node: every process it started shares the session `session_id` (the pid of its
    `ray start`), which is how it is found and stopped without touching any other Ray on the machine."""

    index: int
    session_id: int
    temp_dir: Path
    command: list[str] = field(repr=False)

    def pids(self) -> list[int]:
        """Live processes of this node (zombies left for a reaper do not count)."""
        return session_pids(self.session_id)

    def raylet_pid(self) -> int | None:
        """The node's raylet: the process whose loss takes the node out of the cluster."""
        for pid in self.pids():
            if _process_name(pid) == "raylet":
                return pid
        return None


@dataclass
class LocalRayCluster:
    """A running `local_ray_cluster`: `address` is what `ray.init(address=...)` / `ray_address` take."""

    address: str
    root: Path
    cpus_per_node: int = 1
    object_store_mb: int = 128
    env: dict[str, str] = field(default_factory=dict, repr=False)
    timeout_s: float = 180.0
    cores: list[int] | None = None  # pinned: node i runs on cores[i * cpus_per_node : (i + 1) * cpus_per_node]
    nodes: list[LocalRayNode] = field(default_factory=list)

    def node_cores(self, index: int) -> set[int] | None:
        """The cores node `index` is pinned to (None: not pinned)."""
        if self.cores is None:
            return None
        return set(self.cores[index * self.cpus_per_node:(index + 1) * self.cpus_per_node])

    @property
    def head(self) -> LocalRayNode:
        return self.nodes[0]

    def node_ids(self, alive_only: bool = True) -> dict[str, LocalRayNode]:
        """{Ray node id (hex): the node} as the cluster's GCS lists them (no driver connection needed)."""
        by_temp_dir = {str(node.temp_dir): node for node in self.nodes}
        return {node_id: by_temp_dir[temp_dir] for node_id, (temp_dir, alive) in _gcs_nodes(self.address).items()
                if temp_dir in by_temp_dir and (alive or not alive_only)}

    def _start_node(self, index: int, attempts: int = 3) -> LocalRayNode:
        """`ray start` node `index` (0: the head) in a session of its own; returns once `ray start` has exited.

        A loaded machine can miss Ray's fixed start-up deadlines (30 s for the raylet to register with the GCS, the
        agent's port file): a failed start is stopped, its temp dir cleared, and started again with fresh ports, up
        to `attempts` times; the last failure raises with the end of its log."""
        for _ in range(attempts - 1):
            try:
                return self._start_node_once(index)
            except RuntimeError:
                shutil.rmtree(self.root / f"n{index}", ignore_errors=True)
                if index == 0:  # nothing has joined yet: a fresh port, in case the failed GCS's lingers
                    self.address = f"127.0.0.1:{free_port()}"
        return self._start_node_once(index)

    def _start_node_once(self, index: int) -> LocalRayNode:
        temp_dir = self.root / f"n{index}"
        temp_dir.mkdir(parents=True, exist_ok=True)
        head_port = int(self.address.rsplit(":", 1)[1])
        command = _ray_start_command(temp_dir, self.cpus_per_node, head_port, index == 0, self.object_store_mb << 20)
        log_path = self.root / f"node{index}.log"
        cores = self.node_cores(index)
        pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))  # inherited by all it starts
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=pin)  # noqa: PLW1509 - only sets affinity
        node = LocalRayNode(index, process.pid, temp_dir, command)
        try:
            code = process.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            _stop_session(node.session_id)
            raise RuntimeError(f"`ray start` of node {index} failed (exit {code}):\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        return node

    def restart_node(self, index: int) -> LocalRayNode:
        """Stop what is left of worker node `index` and start it again (a new Ray node id); waits until the
        cluster lists all its nodes alive."""
        if index == 0:
            raise ValueError("the head cannot be restarted: the cluster's state lives in it")
        if _stop_session(self.nodes[index].session_id):
            raise RuntimeError(f"node {index} of {self.address} cannot be stopped")
        self.nodes[index] = self._start_node(index)
        _wait_for_nodes(self.address, len(self.nodes), self.timeout_s)
        return self.nodes[index]

    def kill_node(self, index: int) -> int:
        """SIGKILL node `index`'s raylet (as a lost machine would vanish); returns the pid killed."""
        pid = self.nodes[index].raylet_pid()
        if pid is None:
            raise RuntimeError(f"node {index} of {self.address} has no raylet running")
        os.kill(pid, signal.SIGKILL)
        return pid


def session_pids(session_id: int) -> list[int]:
    """Pids of the live (non-zombie) processes in session `session_id`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) == session_id and _process_state(pid) != "Z":
                pids.append(pid)
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return pids


def _process_stat(pid: int) -> tuple[str, str]:
    """(name, state) of a process from /proc/PID/stat (the name is in parentheses and may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", "X"
    name = text[text.index("(") + 1: text.rindex(")")]
    return name, text[text.rindex(")") + 2:].split(" ", 1)[0]


def _process_name(pid: int) -> str:
    return _process_stat(pid)[0]


def _process_state(pid: int) -> str:
    return _process_stat(pid)[1]


def _stop_session(session_id: int, timeout_s: float = 15.0) -> list[int]:
    """SIGTERM every process of the session, SIGKILL what is left after `timeout_s`; returns the pids still
    alive afterwards (none, unless a process cannot be killed)."""
    for pid in session_pids(session_id):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while session_pids(session_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    return kill_session(session_id)


def kill_session(session_id: int, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process of the session, as a lost machine would, scanning until three scans in a row find
    nothing alive (a process forked while a scan ran is caught by the next); returns the pids still alive."""
    quiet_scans, deadline = 0, time.monotonic() + timeout_s
    while quiet_scans < 3 and time.monotonic() < deadline:
        alive = session_pids(session_id)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        quiet_scans = 0 if alive else quiet_scans + 1
        time.sleep(0.02)
    return session_pids(session_id)


# `ray start`, except that 127.0.0.1 stays 127.0.0.1: Ray turns a loopback node or head address into the machine's
# network address (so that other machines can reach it) and then listens on every interface; its switch for
# keeping loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) also forbids joining a node to a head.
_RAY_START_ON_LOOPBACK = """
import sys
from ray._private import services
from ray.scripts.scripts import main
resolve = services.resolve_ip_for_localhost
services.resolve_ip_for_localhost = lambda host: host if host == "127.0.0.1" else resolve(host)
sys.argv[0] = "ray"
main()
"""


def _ray_start_command(temp_dir: Path, num_cpus: int, head_port: int, head: bool,
                       object_store_memory: int) -> list[str]:
    command = [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start"]
    command += ["--head", "--port", str(head_port)] if head else ["--address", f"127.0.0.1:{head_port}"]
    command += [
        "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--temp-dir", str(temp_dir), "--object-store-memory", str(object_store_memory),
        "--disable-usage-stats",
        # every node of this machine needs its own agent ports (the defaults would collide)
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
    ]
    if head:
        command += ["--include-dashboard", "false", "--ray-client-server-port", str(free_port())]
    return command


def _ray_token_auth_as_local_init() -> None:
    """Authenticate the way `ray.init()` of a new local cluster does: token mode unless RAY_AUTH_MODE says
    otherwise, with the token in ~/.ray/auth_token (made when missing). The mode lands in os.environ, so the
    nodes started from here and the drivers of this process (`ray.init(address=...)`) all agree on it."""
    from ray._private.authentication import authentication_token_setup as auth

    if os.environ.get(auth.AUTH_MODE_ENV_VAR) is None:
        auth.enable_token_auth_by_default()
    auth.ensure_token_if_auth_enabled(None, create_token_if_missing=True)


def _gcs_nodes(address: str) -> dict[str, tuple[str, bool]]:
    """{node id (hex): (temp dir, alive)} from the cluster's GCS (read directly: this process may be a driver of
    another Ray, and a process can only be connected to one)."""
    from ray._raylet import GcsClient

    _ray_token_auth_as_local_init()
    nodes = GcsClient(address=address).get_all_node_info(timeout=5)
    return {node_id.hex(): (info.temp_dir, info.state == 0) for node_id, info in nodes.items()}  # 0: ALIVE


def _wait_for_nodes(address: str, count: int, timeout_s: float) -> None:
    """Block until the cluster's GCS lists `count` alive nodes."""
    deadline = time.monotonic() + timeout_s
    alive, error = 0, None
    while time.monotonic() < deadline:
        try:
            alive = sum(is_alive for _, is_alive in _gcs_nodes(address).values())
            if alive >= count:
                return
        except Exception as caught:  # noqa: BLE001 - the GCS is still starting
            error = caught
        time.sleep(0.5)
    raise TimeoutError(f"the Ray cluster at {address} lists {alive} of {count} nodes alive after {timeout_s:.0f} s"
                       + (f" ({error})" if error else ""))


@contextlib.contextmanager
def local_ray_cluster(nodes: int = 2, cpus_per_node: int = 1, root: Path | None = None,
                      object_store_mb: int = 128, timeout_s: float = 180.0,
                      pin_cores: bool = False) -> Iterator[LocalRayCluster]:
    """A real multi-node Ray cluster on this machine: `ray start --head` plus `nodes - 1` × `ray start --address`,
    every node on 127.0.0.1 with `cpus_per_node` CPUs and its own temp dir under `root`.

    `pin_cores`: every process of node i runs only on cores [i * cpus_per_node, (i + 1) * cpus_per_node) of those
    this process may use, as on separate machines (Ray's CPU count is a scheduling quota, not a limit: without
    pinning, a 1-CPU node's tasks borrow the idle cores through their decoder and encoder threads, which makes a
    1-node measurement look like more than one core). ValueError when there are not enough cores.

    Each node is started in a session of its own and stopped by that session (SIGTERM, then SIGKILL), never with
    `ray stop` (which stops every Ray of the machine) nor by process name. On exit every process the cluster
    started is gone, or RuntimeError says which are left.
    """
    if nodes < 1 or cpus_per_node < 1:
        raise ValueError(f"a local Ray cluster needs >= 1 node and >= 1 CPU per node, got {nodes} x {cpus_per_node}")
    cores = sorted(os.sched_getaffinity(0))
    if pin_cores and len(cores) < nodes * cpus_per_node:
        raise ValueError(f"pinning {nodes} node(s) x {cpus_per_node} CPU(s) to cores of their own needs "
                         f"{nodes * cpus_per_node} cores; this process may use {len(cores)}")
    apply_quiet_env()
    _ray_token_auth_as_local_init()
    own_root = root is None
    # short paths: Ray's unix sockets live under the temp dir and a socket path is limited to 107 bytes
    base = Path(tempfile.mkdtemp(prefix="lvdray-", dir="/tmp")) if own_root else Path(root)
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET_ENV, **LOCAL_RAY_ENV}
    if env.get(_RAY_SINGLE_NODE_ENV) == "0":
        del env[_RAY_SINGLE_NODE_ENV]  # set by a local Ray of this process: it forbids joining nodes
    for key in ("RAY_ADDRESS",):
        env.pop(key, None)
    cluster = LocalRayCluster(address=f"127.0.0.1:{free_port()}", root=base, cpus_per_node=cpus_per_node,
                              object_store_mb=object_store_mb, env=env, timeout_s=timeout_s,
                              cores=cores if pin_cores else None)
    try:
        for index in range(nodes):
            cluster.nodes.append(cluster._start_node(index))
            if index == 0:
                _wait_for_nodes(cluster.address, 1, timeout_s)
        _wait_for_nodes(cluster.address, nodes, timeout_s)
        yield cluster
    finally:
        left = {}
        for node in reversed(cluster.nodes):
            alive = _stop_session(node.session_id)
            if alive:
                left[node.index] = alive
        if own_root:
            shutil.rmtree(base, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the local Ray cluster {cluster.address} survived SIGKILL: {left}")

"""Learned scorers on Ray actor pools: one pool per model, one model load per actor, batched calls.

`annotate(clips, config)` consumes `ClipFrames` as the decode stage produces them and returns
{clip_id: {column: value}} for the manifest. Each clip's frames go into the object store once and every
pool reads the same copy. Per pool, clips are grouped into batches of `pool.batch_size`; a batch goes
to the actor with the fewest queued batches, without waiting for the result, so the producer (decode)
keeps going while the models run. Only when every actor of a pool already has
`pool.max_batches_in_flight` batches queued does the producer wait: that bounds memory, and the time it
spends waiting is measured (`AnnotateReport.producer_blocked_s`) so a run shows whether the pools keep
up with decode. Two pools wait for others: the CLIP text score of a clip is computed against its source
caption when it has one, otherwise against its CoCa caption (so CLIP waits for CoCa on uncaptioned clips),
and the LLM summary of a clip is written from its CoCa and video captions (so it waits for both). The
three captioners each fill their entry of the `captions` struct (`merge_captions`).

On a GPU cluster a pool's actors each get `1 / actors_per_gpu` of a GPU (num_gpus=None) and pools
share the cluster's GPUs evenly; on a CPU-only cluster each pool has one CPU actor by default and the
CPU reservations are scaled down to fit next to decode (see README "Scorers on a Ray GPU cluster").
With `use_ray=False` the same scorers run in this process, synchronously (tests, debugging).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from common.requests import RequestError
from curation.scorers import build_scorer, pool_config
from curation.scorers.base import error_row
from curation.scorers.captions import merge_captions
from curation.scorers.config import ActorPoolConfig, ScorersConfig
from curation.scorers.graph import inputs_in_call, schedule, settings_of, spec_of
from curation.types import ClipFrames
from dataformat.schema import Column

logger = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 900.0  # model loading included; an actor that cannot be placed fails with a clear error


class ScorerWorker:
    """Holds one loaded scorer. Used directly in-process, or as the body of a Ray actor."""

    def __init__(self, name: str, config: ScorersConfig, threads: int) -> None:
        started = time.perf_counter()
        self.name = name
        self.scorer = build_scorer(name, config, "auto", threads)
        self.load_seconds = time.perf_counter() - started

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "load_s": self.load_seconds, "columns": list(self.scorer.columns),
                **self.scorer.describe()}

    def score(self, items: list[Any], extras: list[dict | None] | None = None) -> tuple[list[dict], float]:
        """Score a batch; items are ClipFrames or (in an actor) object refs to them. `extras` (the columns of
        the scorers this one reads) are merged into `ClipFrames.extra`. Returns rows, seconds."""
        clips = _resolve(items)
        if extras is not None:
            clips = [
                dataclasses.replace(clip, extra={**clip.extra, **extra}) if extra else clip
                for clip, extra in zip(clips, extras, strict=True)
            ]
        started = time.perf_counter()
        rows = self.scorer.score(clips)
        return rows, time.perf_counter() - started


def _resolve(items: list[Any]) -> list[ClipFrames]:
    if items and not isinstance(items[0], ClipFrames):
        import ray

        return list(ray.get(items))
    return list(items)


@dataclass
class PoolStats:
    """What one pool did: how busy its actors were and how full its queues stayed."""

    name: str
    actors: int = 0
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    max_batches_in_flight: int = 0
    device: str = ""
    load_s: float = 0.0
    batches: int = 0
    clips: int = 0
    busy_s: float = 0.0  # summed scorer time inside the actors
    producer_blocked_s: float = 0.0  # producer waited because every actor's queue was full
    blocked_submissions: int = 0
    queued_batch_seconds: float = 0.0  # integral of batches in flight over time
    first_submit: float | None = None
    last_result: float | None = None

    @property
    def active_s(self) -> float:
        if self.first_submit is None or self.last_result is None:
            return 0.0
        return max(self.last_result - self.first_submit, 1e-9)

    @property
    def utilisation(self) -> float:
        """Share of the pool's active time its actors spent scoring."""
        return self.busy_s / (self.active_s * max(1, self.actors)) if self.active_s else 0.0

    @property
    def queue_occupancy(self) -> float:
        """Mean batches in flight per actor over the pool's active time, relative to the queue bound."""
        if not self.active_s:
            return 0.0
        return self.queued_batch_seconds / (self.active_s * max(1, self.actors) * max(1, self.max_batches_in_flight))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("first_submit"), out.pop("last_result")
        out.update(active_s=self.active_s, utilisation=self.utilisation, queue_occupancy=self.queue_occupancy,
                   clips_per_s=self.clips / self.active_s if self.active_s else 0.0)
        return out


@dataclass
class AnnotateReport:
    clips: int = 0
    wall_s: float = 0.0
    producer_s: float = 0.0  # time spent inside the clip iterator (decode and loading)
    producer_blocked_s: float = 0.0
    unavailable: dict[str, str] = field(default_factory=dict)
    pools: dict[str, PoolStats] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"clips": self.clips, "wall_s": self.wall_s, "producer_s": self.producer_s,
                "producer_blocked_s": self.producer_blocked_s, "unavailable": dict(self.unavailable),
                "pools": {name: stats.as_dict() for name, stats in self.pools.items()}}

    def lines(self) -> list[str]:
        out = [f"{self.clips} clips in {self.wall_s:.1f} s; producer blocked {self.producer_blocked_s:.2f} s"]
        for name, s in self.pools.items():
            out.append(
                f"{name}: {s.actors} actor(s) on {s.device or '?'} (gpus {s.num_gpus:g}, cpus {s.num_cpus:g}), "
                f"{s.batches} batches, {s.clips} clips, utilisation {s.utilisation:.0%}, "
                f"queue occupancy {s.queue_occupancy:.0%}, load {s.load_s:.1f} s"
            )
        out.extend(f"{name}: {why}" for name, why in self.unavailable.items())
        return out


SOURCE_TASK_CPUS = 1.0  # a curate-batch task is a plain Ray task: it needs one whole CPU


@dataclass
class _Placement:
    num_actors: int
    num_gpus: float
    num_cpus: float


def plan_placement(names: list[str], config: ScorersConfig, cluster: dict[str, float]) -> dict[str, _Placement]:
    """Actors and resources per pool for a cluster with `cluster` resources (ray.cluster_resources()).

    GPUs: auto num_gpus = 1/actors_per_gpu; pools with auto num_actors share the GPUs evenly.
    CPUs: when the pools would reserve more than half the cluster's CPUs (decode needs the rest), each
    actor's num_cpus is scaled down; threads per actor stay `pool.torch_threads`.
    """
    gpus = float(cluster.get("GPU", 0.0))
    cpus = float(cluster.get("CPU", 1.0))
    placements: dict[str, _Placement] = {}

    def auto_gpus(name: str) -> float:
        if gpus <= 0 or not spec_of(name).gpu_usable(settings_of(config, name)):
            return 0.0
        return 1.0 / pool_config(name, config).actors_per_gpu

    def wanted_gpus(name: str) -> float:
        pool = pool_config(name, config)
        return pool.num_gpus if pool.num_gpus is not None else auto_gpus(name)

    gpu_pools = [n for n in names if wanted_gpus(n) > 0]
    for name in names:
        pool: ActorPoolConfig = pool_config(name, config)
        num_gpus = wanted_gpus(name)
        if pool.num_actors is not None:
            num_actors = pool.num_actors
        elif num_gpus > 0:
            num_actors = max(1, math.floor(gpus / len(gpu_pools) / num_gpus + 1e-9))
        else:
            num_actors = 1
        placements[name] = _Placement(num_actors, num_gpus, pool.num_cpus)
    needed_gpus = sum(p.num_actors * p.num_gpus for p in placements.values())
    if needed_gpus > gpus + 1e-9:
        detail = ", ".join(f"{n}: {p.num_actors} x {p.num_gpus:g}" for n, p in placements.items() if p.num_gpus)
        raise ValueError(
            f"scorer pools need {needed_gpus:g} GPUs but the Ray cluster has {gpus:g} ({detail}); "
            "lower scorers.<name>.pool.num_actors / num_gpus"
        )
    needed_cpus = sum(p.num_actors * p.num_cpus for p in placements.values())
    budget = max(cpus / 2, 0.01)
    if needed_cpus > budget:
        scale = budget / needed_cpus
        logger.info("scorer pools would reserve %.2f of %.0f CPUs; scaling num_cpus by %.2f", needed_cpus, cpus, scale)
        for placement in placements.values():
            placement.num_cpus = round(placement.num_cpus * scale, 4)
    reserved = sum(p.num_actors * p.num_cpus for p in placements.values())
    # A cluster without any CPU yet is an autoscaling one at zero workers (the KubeRay config's head has none):
    # the CPUs it will have are not known here, so it is not refused.
    if placements and cluster.get("CPU", 0.0) > 0 and cpus - reserved < SOURCE_TASK_CPUS - 1e-9:
        detail = ", ".join(f"{n}: {p.num_actors} x {p.num_cpus:g}" for n, p in placements.items())
        raise ValueError(
            f"the Ray cluster has {cpus:g} CPU(s): the scorer pools reserve {reserved:g} ({detail}) and each "
            f"curate-batch task needs {SOURCE_TASK_CPUS:g}, so no source could ever start; give the cluster "
            "2 or more CPUs or run the scorers in process (scorers.use_ray=false)"
        )
    return placements


def check_cluster_fits(config: ScorersConfig, ray_address: str | None) -> None:
    """Before any work (no output written, no driver connected): refuse a Ray cluster at `ray_address` that
    `plan_placement` would refuse once the run is under way, in one line (RequestError) naming the pools and
    the CPUs/GPUs they need against those the cluster has. Found only there, the refusal comes after the
    sources were discovered and their first batches submitted, as a flow run's tracebacks. Nothing to check
    for in-process scorers, a local run (its Ray starts with the run) or a Ray Client address (ray://)."""
    if not config.use_ray or not ray_address:
        return
    from infra.local import RayConnectionError, ray_cluster_resources

    names = schedule(config.active())
    if not names:
        return
    try:
        resources = ray_cluster_resources(ray_address)
        if resources is not None:
            plan_placement(names, config, resources)
    except (RayConnectionError, ValueError) as error:
        raise RequestError(str(error)) from None


class ScorerPool:
    """Actors of one scorer, a buffer that forms batches, and the batches still in flight."""

    def __init__(self, name: str, config: ScorersConfig, use_ray: bool, placement: _Placement | None) -> None:
        self.name = name
        self.config = pool_config(name, config)
        self.use_ray = use_ray
        self.buffer: list[tuple[str, Any, str | None, dict | None]] = []
        self.inflight: dict[Any, tuple[int, list[str]]] = {}
        self.per_actor: list[int] = []
        self.done: list[tuple[list[str], list[dict]]] = []
        self.stats = PoolStats(name=name, max_batches_in_flight=self.config.max_batches_in_flight)
        self._last_change = time.perf_counter()
        self._pending_infos: list[Any] = []
        if use_ray:
            import ray

            self.placement = placement or _Placement(1, 0.0, self.config.num_cpus)
            remote = ray.remote(ScorerWorker).options(
                num_cpus=self.placement.num_cpus, num_gpus=self.placement.num_gpus, max_restarts=1, max_task_retries=1
            )
            threads = self.config.torch_threads
            self.workers = [remote.remote(name, config, threads) for _ in range(self.placement.num_actors)]
            self._pending_infos = [w.info.remote() for w in self.workers]  # resolves once the model is loaded
            self.stats.num_gpus, self.stats.num_cpus = self.placement.num_gpus, self.placement.num_cpus
        else:
            self.workers = [ScorerWorker(name, config, self.config.torch_threads)]
            self._set_infos([self.workers[0].info()])
        self.per_actor = [0] * len(self.workers)
        self.stats.actors = len(self.workers)

    def reset_stats(self) -> None:
        """Start counting afresh (a pool reused for another `annotate` call); keeps what describes the pool."""
        old = self.stats
        self.stats = PoolStats(name=old.name, actors=old.actors, num_gpus=old.num_gpus, num_cpus=old.num_cpus,
                               max_batches_in_flight=self.config.max_batches_in_flight, device=old.device,
                               load_s=old.load_s)
        self._last_change = time.perf_counter()

    def _set_infos(self, infos: list[dict[str, Any]]) -> None:
        self.info = infos[0]
        self.stats.device = infos[0].get("device", "")
        self.stats.load_s = max(info["load_s"] for info in infos)

    def wait_ready(self, timeout_s: float = ACTOR_START_TIMEOUT_S) -> None:
        """Block until every actor has loaded its model; clear errors when they cannot start."""
        if not self._pending_infos:
            return
        import ray

        name, placement = self.name, self.placement
        try:
            infos = ray.get(self._pending_infos, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            raise RuntimeError(
                f"{name} scorer actors did not start within {timeout_s:.0f} s: the cluster cannot place "
                f"{placement.num_actors} actor(s) with num_cpus={placement.num_cpus:g}, "
                f"num_gpus={placement.num_gpus:g}; lower scorers.{name}.pool settings"
            ) from error
        except ray.exceptions.RayError as error:
            raise RuntimeError(f"{name} scorer actor failed to load its model: {error}") from error
        self._pending_infos = []
        self._set_infos(infos)

    # -- producer side ---------------------------------------------------------------------------
    def add(self, clip_id: str, item: Any, extra: dict | None = None) -> None:
        self.buffer.append((clip_id, item, extra))
        if len(self.buffer) >= self.config.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self._submit(batch)

    def _submit(self, batch: list[tuple[str, Any, dict | None]]) -> None:
        clip_ids = [entry[0] for entry in batch]
        items = [entry[1] for entry in batch]
        extras = [entry[2] for entry in batch] if any(entry[2] for entry in batch) else None
        now = time.perf_counter()
        if self.stats.first_submit is None:
            self.stats.first_submit = now
        self.stats.batches += 1
        self.stats.clips += len(batch)
        if not self.use_ray:
            rows, seconds = self.workers[0].score(items, extras)
            self.stats.busy_s += seconds
            self.stats.last_result = time.perf_counter()
            self.done.append((clip_ids, rows))
            return
        if min(self.per_actor) >= self.config.max_batches_in_flight:
            waited = time.perf_counter()
            while min(self.per_actor) >= self.config.max_batches_in_flight:
                self._poll(block=True)
            self.stats.producer_blocked_s += time.perf_counter() - waited
            self.stats.blocked_submissions += 1
        actor = min(range(len(self.workers)), key=lambda i: self.per_actor[i])
        self._tick()
        ref = self.workers[actor].score.remote(items, extras)
        self.inflight[ref] = (actor, clip_ids)
        self.per_actor[actor] += 1

    # -- results -------------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.perf_counter()
        self.stats.queued_batch_seconds += len(self.inflight) * (now - self._last_change)
        self._last_change = now

    def collect(self) -> list[tuple[list[str], list[dict]]]:
        """Batches finished so far, as (clip_ids, rows); never waits."""
        self._poll(block=False)
        finished, self.done = self.done, []
        return finished

    def _poll(self, block: bool) -> None:
        """Move finished batches to `done`; with `block`, wait for at least one if any is in flight."""
        if self.use_ray and self.inflight:
            import ray

            refs = list(self.inflight)
            ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
            self._tick()
            for ref in ready:
                actor, clip_ids = self.inflight.pop(ref)
                self.per_actor[actor] -= 1
                try:
                    rows, seconds = ray.get(ref)
                except (ray.exceptions.RayError, OSError) as error:
                    message = f"{self.name}: scorer actor failed: {type(error).__name__}: {str(error)[:300]}"
                    rows, seconds = [error_row(self.info["columns"], message) for _ in clip_ids], 0.0
                self.stats.busy_s += seconds
                self.stats.last_result = time.perf_counter()
                self.done.append((clip_ids, rows))

    @property
    def busy(self) -> bool:
        return bool(self.buffer or self.inflight or self.done)

    def close(self) -> None:
        if self.use_ray:
            import ray

            for worker in self.workers:
                ray.kill(worker)
        self.workers = []


def _wait_any(pools: list[ScorerPool]) -> None:
    """Block until some batch of any pool finishes (Ray); a no-op in-process."""
    refs = [ref for pool in pools if pool.use_ray for ref in pool.inflight]
    if refs:
        import ray

        ray.wait(refs, num_returns=1)


def start_pools(names: list[str], config: ScorersConfig) -> dict[str, ScorerPool]:
    """Start one pool per scorer name (actors load their model before this returns)."""
    placements: dict[str, _Placement] = {}
    if config.use_ray:
        import ray

        if not ray.is_initialized():
            from infra.local import ray_init_kwargs

            ray.init(**ray_init_kwargs())
        placements = plan_placement(names, config, ray.cluster_resources())
    pools: dict[str, ScorerPool] = {}
    try:
        for name in names:  # all actors start loading in parallel ...
            pools[name] = ScorerPool(name, config, config.use_ray, placements.get(name))
        for pool in pools.values():  # ... and are then waited for
            pool.wait_ready()
    except BaseException:
        for pool in pools.values():
            pool.close()
        raise
    return pools


def annotate(
    clips: Iterable[ClipFrames],
    config: ScorersConfig,
    names: list[str] | None = None,
    report: AnnotateReport | None = None,
    pools: dict[str, ScorerPool] | None = None,
    on_clip_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every clip with the active scorers; returns {clip_id: {column: value, ...}}.

    `names` defaults to `config.active()` (enabled scorers with weights; the others are listed in
    `report.unavailable` and logged with the setting that would switch them on). Errors of single
    clips come back in a `scorer_errors` list. Pass `pools` from `start_pools` to reuse loaded models
    across calls; otherwise pools are started here and stopped on return. `on_clip_done(clip_id, row)`
    is called as soon as every scorer has finished a clip (the flow persists results per source with it).
    """
    report = report if report is not None else AnnotateReport()
    report.unavailable = ({n: why for n, why in config.unavailable().items() if spec_of(n).per_clip}
                          if names is None else {})
    for name, why in report.unavailable.items():
        logger.warning("%s scorer %s", name, why)
    names = schedule(names if names is not None else config.active())  # every scorer after those it reads
    inputs = {name: inputs_in_call(name, names) for name in names}
    started = time.perf_counter()
    own_pools = pools is None
    pools = pools if pools is not None else (start_pools(names, config) if names else {})
    pools = {name: pools[name] for name in names}
    if not own_pools:
        for pool in pools.values():
            pool.reset_stats()
    results: dict[str, dict[str, Any]] = defaultdict(dict)
    # scorer -> clip_id -> (item, the scorers whose output it still waits for)
    waiting: dict[str, dict[str, tuple[Any, set[str]]]] = {name: {} for name in names}
    outstanding: dict[str, int] = {}  # clip_id -> scorers still to report

    def pending(name: str) -> bool:
        return pools[name].busy or bool(waiting[name])

    def handed_over(clip_id: str, name: str) -> dict[str, Any]:
        """The columns of the scorers `name` reads, for its `ClipFrames.extra`."""
        row = results[clip_id]
        return {column: row.get(column) for need in inputs[name] for column in spec_of(need).columns}

    def finish_one(clip_id: str) -> None:
        outstanding[clip_id] -= 1
        if outstanding[clip_id] == 0:
            del outstanding[clip_id]
            if on_clip_done is not None:
                on_clip_done(clip_id, results[clip_id])

    def merge(pool: ScorerPool, finished: list[tuple[list[str], list[dict]]]) -> None:
        for clip_ids, rows in finished:
            for clip_id, row in zip(clip_ids, rows, strict=True):
                row = dict(row)
                error = row.pop("error", None)
                if error:
                    results[clip_id].setdefault("scorer_errors", []).append(error)
                if Column.CAPTIONS in row:  # each captioner fills its own entry of the struct
                    row[Column.CAPTIONS] = merge_captions(results[clip_id].get(Column.CAPTIONS), row[Column.CAPTIONS])
                results[clip_id].update(row)
                finish_one(clip_id)
                for name in names:  # hand the clip on to the scorers that waited for this one
                    if clip_id in waiting[name] and pool.name in waiting[name][clip_id][1]:
                        item, still = waiting[name][clip_id]
                        still.discard(pool.name)
                        if not still:
                            del waiting[name][clip_id]
                            pools[name].add(clip_id, item, extra=handed_over(clip_id, name))

    def drain(block: bool) -> None:
        if block:
            _wait_any(list(pools.values()))
        for pool in pools.values():
            merge(pool, pool.collect())

    try:
        iterator = iter(clips)
        while True:
            before = time.perf_counter()
            clip = next(iterator, None)
            report.producer_s += time.perf_counter() - before
            if clip is None:
                break
            report.clips += 1
            results[clip.clip_id]  # every clip gets a row, even if no scorer runs
            if not pools:
                if on_clip_done is not None:
                    on_clip_done(clip.clip_id, results[clip.clip_id])
                continue
            outstanding[clip.clip_id] = len(pools)
            item = _put(clip) if config.use_ray else clip
            for name in names:
                ready = spec_of(name).ready_without_uses
                if not inputs[name] or (not spec_of(name).needs and ready is not None and ready(clip)):
                    pools[name].add(clip.clip_id, item)
                else:
                    waiting[name][clip.clip_id] = (item, set(inputs[name]))
            drain(block=False)
        for name in names:
            if not inputs[name]:
                pools[name].flush()
        while any(pending(name) for name in names):
            drain(block=True)
            for name in names:  # a pool's last partial batch goes once nothing it reads is still to come
                if not any(pending(other) for other in inputs[name]):
                    pools[name].flush()
                    if waiting[name]:  # a bug, not data
                        raise RuntimeError(f"{len(waiting[name])} clips never got the inputs of the {name} scorer")
    finally:
        if own_pools:
            for pool in pools.values():
                pool.close()
    report.wall_s = time.perf_counter() - started
    for name, pool in pools.items():
        report.pools[name] = pool.stats
        report.producer_blocked_s += pool.stats.producer_blocked_s
    return dict(results)


def _put(clip: ClipFrames) -> Any:
    import ray

    return ray.put(clip)

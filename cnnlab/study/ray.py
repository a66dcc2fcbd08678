"""RayExecutor: one Ray task per (variant, seed) run, or per batch of seeds of a variant
(`--batch-seeds K`, cnnlab.engine.batched); the same interface as LocalExecutor.

    executor.run(tasks, on_done)   # blocks; calls on_done(task, outcome) as each run ends

Each task runs cnnlab.study.worker.execute_tasks on a Ray worker, which writes the run directory
itself; only the small outcome dict travels back. So the study directory must be on a file
system that every node mounts at the same path (checked by a probe task on every node
before any run starts; see docs/ray.md). A worker or node that dies is retried by Ray
(`max_retries`), and the run resumes from its last checkpoint.

Ray is imported only here, and only when a RayExecutor is made: the rest of cnnlab works
without the `ray` extra.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from cnnlab.errors import ConfigError, RunError
from cnnlab.study.worker import Task, batch_groups

NEEDS_EXTRA = "the Ray executor needs the ray extra: pip install 'cnnlab[ray]'"
SHARED_DIR_HELP = ("--out must be on a file system that every Ray node mounts at the same path "
                   "(e.g. NFS); see docs/ray.md")
# Environment variables of the driver that the workers get (the same data cache path everywhere).
FORWARD_ENV = ("CNNLAB_DATA",)
GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
LOCK_WAIT_S = 300.0  # how long a retried run waits for its run directory's lock (see _wait_for_run_lock)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(NEEDS_EXTRA) from None
    return ray


# ---------------------------------------------------------------------------- worker side
# Plain module-level functions: Ray pickles them by reference, so each node needs cnnlab
# installed (the same version as the driver).

def cnnlab_run(task: Task | list[Task], threads: int, cwd: str, env: dict, hide_gpus: bool = False,
               lock_wait: float = LOCK_WAIT_S) -> dict | list[dict]:
    """One run on a Ray worker (its process title is `ray::cnnlab_run`), or a list of seeds of
    one variant trained as one batched network (`--batch-seeds`), one outcome each."""
    os.environ.update(env)
    if hide_gpus:
        # A run that asked Ray for no GPU must not use one behind Ray's back (`--device auto`
        # would pick cuda:0 on a GPU node: recent Ray versions no longer hide the GPUs themselves).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from cnnlab.study.worker import execute_tasks, needs_work

    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative idx:DIR paths mean the same as on the driver
    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this (reused) worker process
        pass
    tasks = task if isinstance(task, list) else [task]
    for t in tasks:
        _wait_for_run_lock(Path(t.run_dir), lock_wait)
    # a run finished meanwhile (by a task of an earlier driver that died) is not trained again
    todo = [t for t in tasks if needs_work(t)]
    outcomes = dict(zip([t.label for t in todo], execute_tasks(todo, threads) if todo else []))
    out = [outcomes.get(t.label, {"status": "done"}) for t in tasks]
    return out if isinstance(task, list) else out[0]


def _wait_for_run_lock(run_dir: Path, timeout: float) -> None:
    """A retry after a lost *node* can find the run's lock still held: a network file system frees
    the locks of a dead client only when its lease runs out (NFS: about 90 s). Wait for that;
    a run that is really still training elsewhere is then reported as in use by execute_task."""
    from filelock import FileLock, Timeout

    if not (run_dir / ".lock").exists():
        return
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=timeout, poll_interval=2.0)
    except Timeout:
        return
    lock.release()


def cnnlab_probe(study_dir: str, token_name: str, token: str) -> dict:
    """Check that the driver's study directory is this node's too: read the driver's token, write a reply."""
    d = Path(study_dir)
    host = socket.gethostname()
    try:
        seen = (d / token_name).read_text()
    except OSError as e:
        return {"ok": False, "host": host, "why": f"cannot read a file the driver wrote there: {e.strerror or e}"}
    if seen != token:
        return {"ok": False, "host": host, "why": f"{d} on this node is another directory than the driver's"}
    reply = d / f"{token_name}.{uuid.uuid4().hex}"
    try:
        reply.write_text(token)
    except OSError as e:
        return {"ok": False, "host": host, "why": f"cannot write in {d}: {e.strerror or e}"}
    return {"ok": True, "host": host, "reply": reply.name}


# ---------------------------------------------------------------------------- driver side

def _check_reachable(address: str, timeout: float) -> None:
    """A fast, clear error for a HOST:PORT nobody listens on (ray.init would retry for a long time)."""
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT or auto")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        if isinstance(e, socket.timeout):
            why = f"no answer in {timeout:.0f} s"
        raise RunError(f"cannot reach a Ray cluster at {address}: {why}; start one with `ray start --head` "
                       "or check --address") from None


class RayExecutor:
    """Runs each task as a Ray task: `threads` CPUs (one intra-op thread each by default), or
    `gpus_per_run` GPUs (a fraction shares a GPU) when the run's device is cuda.

    address: a running cluster (HOST:PORT of the head's GCS, ray://HOST:PORT, or "auto");
    None starts a private local Ray instance with `num_cpus` CPUs (default: this machine's cores).
    """

    def __init__(self, address: str | None = None, threads: int = 1, retries: int = 3, study_dir=None,
                 gpus_per_run: float = 1.0, num_cpus: int | None = None, connect_timeout: float = 30.0,
                 poll: Callable[[], None] | None = None, batch_seeds: int = 1):
        self.ray = _import_ray()
        if gpus_per_run <= 0:
            raise ConfigError(f"gpus_per_run must be > 0, got {gpus_per_run}")
        self.address, self.threads, self.retries = address, max(1, threads), retries
        self.study_dir = Path(study_dir) if study_dir is not None else None
        self.gpus_per_run, self.num_cpus, self.connect_timeout = gpus_per_run, num_cpus, connect_timeout
        self.poll = poll or (lambda: None)
        self.batch_seeds = batch_seeds
        if address:
            _check_reachable(address, min(connect_timeout, 10.0))

    # -- resources
    def resources(self, task: Task) -> dict:
        device = str(task.config.get("train", {}).get("device", "auto"))
        if device.startswith("cuda"):
            return {"num_cpus": self.threads, "num_gpus": self.gpus_per_run}
        return {"num_cpus": self.threads, "num_gpus": 0}

    # -- connection
    def _connect(self) -> bool:
        """Connect (or start a local instance). Returns True when we must shut Ray down at the end."""
        ray = self.ray
        if ray.is_initialized():
            return False  # a caller's own Ray session: use it, leave it running
        import logging

        kw = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
        if self.address:
            kw["address"] = self.address
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kw.update(address="local", num_cpus=self.num_cpus or cores, include_dashboard=False,
                      object_store_memory=128 * 1024**2)
        # Something that listens at --address but is not a Ray head would keep ray.init retrying
        # for many minutes (20 tries); one try (about 40 s) is enough to say so.
        scoped = {GCS_WAIT_ENV: "1"} if self.address and GCS_WAIT_ENV not in os.environ else {}
        os.environ.update(scoped)
        # A new local instance turns Ray's token authentication on and says so; keep it on, quietly.
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        auth_level = auth_log.level
        if not self.address:
            auth_log.setLevel(logging.ERROR)
        try:
            ray.init(**kw)
        except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError...: all say "cannot connect"
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            msg = " ".join(str(e).split())[:300]
            hint = "; is it the head's GCS port (6379 by default, as printed by `ray start --head`)?" \
                if self.address and "://" not in self.address else ""
            raise RunError(f"cannot connect to {where}: {type(e).__name__}: {msg}{hint}") from None
        finally:
            for k in scoped:
                os.environ.pop(k, None)
            auth_log.setLevel(auth_level)
        return True

    def _nodes(self) -> list[dict]:
        """The alive nodes that can run work (a head started with --num-cpus=0 cannot)."""
        return [n for n in self.ray.nodes() if n.get("Alive")
                and n.get("Resources", {}).get("CPU", 0) + n.get("Resources", {}).get("GPU", 0) > 0]

    def _check_fits(self, tasks: list[Task]) -> None:
        """A run that no node can hold would wait forever in Ray's queue: say so instead."""
        have = [n.get("Resources", {}) for n in self._nodes()]
        for t in tasks:
            device = str(t.config["train"]["device"])
            if device.startswith("cuda:"):
                raise ConfigError(f"--device {device}: on Ray use --device cuda; Ray gives each run its own GPU "
                                  "(the run sees it as cuda)")
            need = self.resources(t)
            if any(r.get("CPU", 0) >= need["num_cpus"] and r.get("GPU", 0) >= need["num_gpus"] for r in have):
                continue
            cpus = max((r.get("CPU", 0) for r in have), default=0)
            gpus = max((r.get("GPU", 0) for r in have), default=0)
            n_cpu, n_gpu = need["num_cpus"], need["num_gpus"]
            if n_gpu > gpus:
                device = t.config["train"]["device"]
                has = "a GPU" if gpus == 0 else f"{n_gpu:g} GPUs"
                raise RunError(f"run {t.label} wants device {device} ({n_gpu:g} GPU a run) but no node of the "
                               f"Ray cluster has {has}; use --device cpu, or add GPU nodes to the cluster")
            raise RunError(f"--threads {n_cpu} needs {n_cpu} CPUs a run but the largest node of the Ray cluster "
                           f"has {cpus:g}; use fewer --threads")

    def _probe(self, study_dir: Path) -> None:
        """Every alive node must see the driver's study directory, readable and writable."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token_name = f".ray-probe-{uuid.uuid4().hex}"
        token = uuid.uuid4().hex
        tok = study_dir / token_name
        tok.write_text(token)
        replies: list[Path] = []
        try:
            nodes = self._nodes()
            probe = ray.remote(cnnlab_probe)
            refs = {probe.options(num_cpus=0, max_retries=1, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(study_dir), token_name, token): n for n in nodes}
            try:
                results = ray.get(list(refs), timeout=max(60.0, self.connect_timeout))
            except ray.exceptions.GetTimeoutError:
                raise RunError("the Ray workers did not answer the start-up probe in time; "
                               "check that every node has cnnlab installed (pip install 'cnnlab[ray]')") from None
            except ray.exceptions.RayError as e:
                msg = " ".join(str(e).split())[:300]
                raise RunError(f"the start-up probe failed on the Ray cluster ({msg}); "
                               "check that every node has cnnlab installed") from None
            bad = []
            for (ref, node), r in zip(refs.items(), results):
                where = f"{r.get('host')} ({node.get('NodeManagerAddress')})"
                if not r["ok"]:
                    bad.append(f"{where}: {r['why']}")
                    continue
                reply = study_dir / r["reply"]
                replies.append(reply)
                if not reply.exists():
                    bad.append(f"{where}: its writes do not show up here")
            if bad:
                raise RunError(f"the study directory {study_dir} is not shared with the Ray workers: "
                               f"{len(bad)} of {len(nodes)} node(s) cannot use it ({bad[0]}); " + SHARED_DIR_HELP)
        finally:
            for p in [tok, *replies]:
                try:
                    p.unlink()
                except OSError:
                    pass

    # -- the interface
    def run(self, tasks: list[Task], on_done: Callable[[Task, dict], None]) -> None:
        from cnnlab.rundir import read_result

        if not tasks:
            return
        ray = self.ray
        cwd = os.getcwd()
        study_dir = (self.study_dir or Path(tasks[0].run_dir).parents[2]).resolve()
        # absolute paths for the workers; the caller gets its own Task objects back
        remote_tasks = {t.label: dataclasses.replace(t, run_dir=str(Path(t.run_dir).resolve())) for t in tasks}
        env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
        owned = self._connect()
        refs: dict = {}
        try:
            self._check_fits(tasks)
            self._probe(study_dir)
            fn = ray.remote(cnnlab_run)
            for group in batch_groups(tasks, self.batch_seeds):  # one Ray task per run, or per batch of seeds
                res = self.resources(group[0])
                opts = dict(num_cpus=res["num_cpus"], max_retries=self.retries, retry_exceptions=False)
                if res["num_gpus"]:
                    opts["num_gpus"] = res["num_gpus"]
                arg = [remote_tasks[t.label] for t in group] if len(group) > 1 else remote_tasks[group[0].label]
                refs[fn.options(**opts).remote(arg, self.threads, cwd, env, hide_gpus=not res["num_gpus"])] = group
            last_poll = 0.0
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0, fetch_local=False)
                if time.monotonic() - last_poll >= 0.9 or done:
                    self.poll()
                    last_poll = time.monotonic()
                for ref in done:
                    group = refs.pop(ref)
                    for t, outcome in zip(group, self._outcomes(ray, ref, group, read_result)):
                        on_done(t, outcome)
        except BaseException:
            for ref in refs:
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass
            raise
        finally:
            if owned:
                ray.shutdown()

    def _outcomes(self, ray, ref, group: list[Task], read_result) -> list[dict]:
        """Each run's outcome: what the worker said, or why its Ray task failed (for all of them)."""
        got = self._outcome(ray, ref)
        outs = got if isinstance(got, list) else [got] * len(group)
        return [self._visible(task, outcome, read_result) for task, outcome in zip(group, outs)]

    def _outcome(self, ray, ref) -> dict | list[dict]:
        try:
            return ray.get(ref)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
            n = self.retries + 1
            return {"status": "failed", "error": f"its Ray worker died {n} time{'s' if n > 1 else ''} (killed, "
                                                 f"out of memory or node lost: {type(e).__name__}); run the "
                                                 "study again to resume it"}
        except ray.exceptions.OutOfMemoryError:
            return {"status": "failed", "error": "killed by Ray's memory monitor (node out of memory)"}
        except ray.exceptions.RayError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            return {"status": "failed", "error": f"{type(e).__name__}: {lines[-1] if lines else ''}"}

    @staticmethod
    def _visible(task: Task, outcome: dict, read_result) -> dict:
        if outcome.get("status") == "done" and read_result(task.run_dir) is None:
            return {"status": "failed", "error": f"the worker finished but {task.run_dir}/result.json is not "
                                                 f"visible here; " + SHARED_DIR_HELP}
        return outcome

"""The Ray executor on a real two-node Ray cluster on loopback (a head and a worker node,
one CPU each): same results as the local executor, a killed worker resumes its run, and
clear one-line errors for a missing extra or an unreachable cluster.

The cluster listens on 127.0.0.2, not 127.0.0.1: Ray rewrites 127.0.0.1 and localhost in an
address to the machine's outward IP, and these tests must talk over loopback only.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cnnlab.cli import main

from conftest import make_idx_dir

pytestmark = pytest.mark.ray

HOST = "127.0.0.2"
RAY_BIN = Path(sys.executable).with_name("ray")
STUDY = """\
name = "raytest"
seeds = 2
[base]
data = {{ name = "idx:{data}", val_size = 100 }}
model = {{ preset = "lab2-2c2f" }}
train = {{ epochs = 3, batch_size = 50, lr = 0.001 }}
[variants]
"base" = {{}}
"fast" = {{ train = {{ lr = 0.003 }} }}
[comparisons]
lr = ["fast", "base"]
"""
LABELS = [f"{v}/seed-{s}" for v in ("base", "fast") for s in (0, 1)]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _cluster_pids(markers: list[str]) -> set[int]:
    """Processes whose command line names this cluster (its temp dir or GCS address), and their children."""
    pids, parents = set(), {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(p.name)] = ppid
        if any(m in cmd for m in markers) and int(p.name) != os.getpid():
            pids.add(int(p.name))
    grew = True
    while grew:
        kids = {pid for pid, ppid in parents.items() if ppid in pids} - pids
        grew = bool(kids)
        pids |= kids
    return pids


def _stop_cluster(markers: list[str]) -> None:
    """Stop only this test's Ray processes, by pid (`ray stop` would stop every Ray on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _cluster_pids(markers)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 5
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"}
        if not pids:
            return


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node (1 CPU each) on HOST; yields the address for --address.

    Ray's token authentication is off for this loopback-only cluster, explicitly for the nodes and
    this process (the driver), so that a ~/.ray/auth_token on the machine changes nothing (and no
    token is written there)."""
    pytest.importorskip("ray")
    if not RAY_BIN.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    tmp = tempfile.mkdtemp(prefix="cnnlab-ray-")  # short: Ray's unix sockets live under it
    port = _free_port(HOST)
    address = f"{HOST}:{port}"
    markers = [tmp, address]
    auth = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**_ray_env(), **auth}
    mp = pytest.MonkeyPatch()
    for k, v in auth.items():
        mp.setenv(k, v)
    common = ["--num-cpus=1", "--disable-usage-stats", f"--node-ip-address={HOST}",
              "--object-store-memory=100000000"]
    try:
        # every port this machine could already have in use is a free one (no fixed defaults)
        for cmd in ([str(RAY_BIN), "start", "--head", f"--port={port}", "--include-dashboard=false",
                     f"--ray-client-server-port={_free_port(HOST)}", f"--temp-dir={tmp}",
                     f"--dashboard-agent-listen-port={_free_port(HOST)}", *common],
                    [str(RAY_BIN), "start", f"--address={address}",
                     f"--dashboard-agent-listen-port={_free_port(HOST)}", *common]):
            r = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        yield address
    finally:
        mp.undo()
        _stop_cluster(markers)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("raystudy")
    data = make_idx_dir(root / "synth", n_train=1100, n_test=200)  # 1000 train / 100 val: 20 steps an epoch
    f = root / "study.toml"
    f.write_text(STUDY.format(data=data))
    return f


@pytest.fixture(scope="module")
def local_study(study_file):
    """The reference: the same study through the local executor."""
    out = study_file.parent / "local"
    assert main(["study", str(study_file), "--out", str(out), "--workers", "2", "--no-report"]) == 0
    return out


def _numbers(study_dir: Path) -> dict:
    """Per run: every metrics.csv row (without the timing column) and the result's accuracies."""
    out = {}
    for label in LABELS:
        run = study_dir / "runs" / label
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        res = json.loads((run / "result.json").read_text())
        out[label] = {
            "rows": [{k: v for k, v in r.items() if k != "seconds"} for r in rows],
            "result": {k: res[k] for k in ("status", "seed", "test_accuracy", "test_accuracy_eval",
                                            "test_accuracy_train", "test_loss", "best_epoch", "best_val_acc")},
        }
    return out


def _check_complete(study_dir: Path) -> None:
    """Every run: one result.json with status done, each epoch exactly once in metrics.csv and train.log."""
    runs = sorted(p.relative_to(study_dir / "runs").as_posix() for p in (study_dir / "runs").glob("*/seed-*"))
    assert runs == sorted(LABELS)
    for label in LABELS:
        run = study_dir / "runs" / label
        assert json.loads((run / "result.json").read_text())["status"] == "done"
        assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [0, 1, 2]
        log = (run / "train.log").read_text().splitlines()
        assert [line.split()[1] for line in log if line.startswith("Epoch:")] == ["0", "1", "2"]
        assert not (run / "error.txt").exists()


def test_ray_study_matches_local_executor(cluster, study_file, local_study, tmp_path, capsys):
    out = tmp_path / "ray"
    rc = main(["study", str(study_file), "--out", str(out), "--executor", "ray", "--address", cluster])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "4 runs trained, 0 already finished, 0 failed" in captured.out
    _check_complete(out)
    ray_numbers, local_numbers = _numbers(out), _numbers(local_study)
    assert ray_numbers == local_numbers  # bit-identical: same seeds, one thread, same code
    # the same layout, so `cnnlab report` cannot tell them apart
    for label in LABELS:
        names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.name != ".lock")
        assert names(out / "runs" / label) == names(local_study / "runs" / label)
    assert (out / "report.md").is_file() and (out / "study.json").is_file()
    assert not list(out.glob(".ray-probe-*"))  # the probe cleans up after itself
    # a second time: everything is finished, nothing runs
    assert main(["study", str(study_file), "--out", str(out), "--executor", "ray", "--address", cluster,
                 "--no-report"]) == 0
    assert "4 of 4 runs already finished; 0 to run" in capsys.readouterr().out


def test_ray_batched_study_matches_local_batched_study(cluster, study_file, tmp_path, capsys):
    """--batch-seeds 2: each variant's two seeds are one Ray task (cnnlab.engine.batched), with the
    local executor's numbers, bit for bit."""
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert main(["study", str(study_file), "--out", str(local), "--workers", "2", "--batch-seeds", "2",
                 "--no-report"]) == 0
    rc = main(["study", str(study_file), "--out", str(ray_out), "--executor", "ray", "--address", cluster,
               "--batch-seeds", "2", "--no-report"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "4 runs trained, 0 already finished, 0 failed" in captured.out
    _check_complete(ray_out)
    assert _numbers(ray_out) == _numbers(local)
    for label in LABELS:
        assert "2 seeds batched" in json.loads((ray_out / "runs" / label / "result.json").read_text())["kernels"]


def _runs_in_flight(study_dir: Path) -> dict[int, Path]:
    """pid -> run directory, for each process that holds a run's lock (a worker training it)."""
    found = {}
    runs = str((study_dir / "runs").resolve())
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            for fd in (p / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(runs) and target.endswith("/.lock"):
                    found[int(p.name)] = Path(target).parent
        except OSError:
            continue
    return found


def test_killed_worker_is_retried_and_resumes(cluster, study_file, local_study, tmp_path, capsys):
    """kill -9 a Ray worker while it trains a run, after the run's first checkpoint: Ray retries the
    task, the run resumes from its checkpoint, and the study ends with every run done once."""
    import threading

    out = tmp_path / "ray-fault"
    killed: list[Path] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid, run in _runs_in_flight(out).items():
                try:
                    os.kill(pid, signal.SIGSTOP)  # freeze it, then look
                except OSError:
                    continue
                if (run / "checkpoints" / "last.safetensors").exists() and not (run / "result.json").exists():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(run)
                    break
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rc = main(["study", str(study_file), "--out", str(out), "--executor", "ray", "--address", cluster,
                   "--retries", "2", "--no-report"])
    finally:
        stop.set()
        t.join(10)
    captured = capsys.readouterr()
    assert killed, "the test never caught a run between its first checkpoint and its end"
    assert rc == 0, captured.err
    assert "4 runs trained, 0 already finished, 0 failed" in captured.out
    _check_complete(out)
    # the resumed run is bit-identical to the uninterrupted local one; so are the others
    assert _numbers(out) == _numbers(local_study)
    stdout = (killed[0] / "stdout.log").read_text()
    assert stdout.count("Epoch: 0 ") == 1  # epoch 0 came from the checkpoint, not trained again


def test_missing_extra_is_one_clear_line(study_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    rc = main(["study", str(study_file), "--out", str(tmp_path / "x"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == "cnnlab study: error: the Ray executor needs the ray extra: pip install 'cnnlab[ray]'\n"
    assert not (tmp_path / "x").exists()


def test_unreachable_address_is_one_clear_line(study_file, tmp_path, capsys):
    pytest.importorskip("ray")
    port = _free_port("127.0.0.1")  # closed again: nobody listens there
    t0 = time.time()
    rc = main(["study", str(study_file), "--out", str(tmp_path / "x"), "--executor", "ray",
               "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and time.time() - t0 < 30
    assert err.count("\n") == 1 and err.startswith(f"cnnlab study: error: cannot reach a Ray cluster at 127.0.0.1:{port}")
    assert "ray start --head" in err
    assert not (tmp_path / "x").exists()


def test_bad_address_format(study_file, tmp_path, capsys):
    pytest.importorskip("ray")
    rc = main(["study", str(study_file), "--out", str(tmp_path / "x"), "--executor", "ray", "--address", "nohost"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "expected HOST:PORT" in err


def test_study_dir_not_shared_with_workers_fails_clearly(cluster, study_file, tmp_path):
    """The driver sees a study directory that the workers do not (a private mount over it): the
    start-up probe refuses to run, with the shared-directory requirement in one line."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private mount")
    private = tmp_path / "private"
    private.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from cnnlab.cli import main; "
            f"sys.exit(main(['study', {str(study_file)!r}, '--out', {str(private / 'out')!r}, "
            f"'--executor', 'ray', '--address', {cluster!r}, '--no-report']))")
    script = f"mount -t tmpfs tmpfs {private} && exec {sys.executable} -c \"$0\""
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, code],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if r.returncode != 2 and "mount" in r.stderr and "permission" in r.stderr.lower():
        pytest.skip("private mounts are not allowed here")
    err = [line for line in r.stderr.splitlines() if line.startswith("cnnlab study:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(err) == 1 and "is not shared with the Ray workers" in err[0] and "same path" in err[0], r.stderr
    assert not (private / "out").exists()  # outside the private mount, nothing was written


def test_resource_requests():
    pytest.importorskip("ray")
    from cnnlab.study.ray import RayExecutor
    from cnnlab.study.worker import Task

    def task(device):
        return Task("v", 0, {"train": {"device": device}}, "/tmp/none")

    ex = RayExecutor(threads=1)
    assert ex.resources(task("cpu")) == {"num_cpus": 1, "num_gpus": 0}
    assert ex.resources(task("auto")) == {"num_cpus": 1, "num_gpus": 0}  # auto asks for no GPU: CPU on Ray
    assert ex.resources(task("cuda")) == {"num_cpus": 1, "num_gpus": 1.0}
    shared = RayExecutor(threads=2, gpus_per_run=0.25)  # four runs share a GPU
    assert shared.resources(task("cuda")) == {"num_cpus": 2, "num_gpus": 0.25}


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "wants device cuda (1 GPU a run) but no node of the Ray cluster has a GPU"),
    (["--device", "cuda:1"], "--device cuda:1: on Ray use --device cuda"),
    (["--threads", "2"], "--threads 2 needs 2 CPUs a run but the largest node of the Ray cluster has 1"),
])
def test_run_that_no_node_can_hold_is_refused(cluster, study_file, tmp_path, capsys, flags, message):
    """Instead of waiting forever in Ray's queue."""
    rc = main(["study", str(study_file), "--out", str(tmp_path / "x"), "--executor", "ray", "--address", cluster,
               "--no-report", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not list((tmp_path / "x").glob("runs/*/*/result.json"))


def test_the_rgb_example_through_ray_matches_local(cluster, tmp_path, capsys):
    """The README's own-model-and-data example (a factory's module, RGB npz data, normalisation)
    through Ray: the same numbers as the local executor, and the report builds from them."""
    from tests.test_rgb_example import example_study, make_shapes

    shapes = make_shapes.write(tmp_path / "shapes", n_train=800, n_test=100, seed=2, folder=False)
    study = example_study(tmp_path)
    args = ["--data", f"npz:{shapes / 'shapes.npz'}", "--epochs", "1", "--seeds", "1", "--limit", "150"]
    assert main(["study", str(study), "--out", str(tmp_path / "local"), "--workers", "2", "--no-report", *args]) == 0
    rc = main(["study", str(study), "--out", str(tmp_path / "ray"), "--executor", "ray", "--address", cluster, *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for variant in ("resnet", "resnet-narrow", "lab2-3c3f-bn"):
        local, ray = (json.loads((tmp_path / d / "runs" / variant / "seed-0" / "result.json").read_text())
                      for d in ("local", "ray"))
        for key in ("test_accuracy_eval", "test_accuracy_train", "test_loss", "factory"):
            assert ray.get(key) == local.get(key), (variant, key)
    assert "Model graph of resnet, traced from the module" in (tmp_path / "ray" / "report.html").read_text()

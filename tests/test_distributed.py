"""Two gloo processes on the CPU (torchrun) train the same model as one process."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist
from test_train import read_csv

import loader
from conftest import ROOT, mixture_ratings

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="this torch build has no gloo backend for CPU processes"),
    pytest.mark.skipif(sys.platform == "win32", reason="torchrun's standalone mode needs POSIX"),
]

GLOO_PROBE = """
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
"""


def torchrun(tmp_path, script_args, nproc=2, env=None):
    """Run torchrun --standalone (a private rendezvous on a free localhost port); returns
    (returncode, stdout, stderr). A timeout kills the launcher and every worker it started."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *script_args]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env=env)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{nproc}-process run did not finish in 300 s")
    return process.returncode, out, err


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """Skip the module only where two gloo processes cannot even meet: decided by a probe that
    does nothing else, so that a crash of train.py is never mistaken for a platform limit."""
    folder = tmp_path_factory.mktemp("gloo-probe")
    (folder / "probe.py").write_text(GLOO_PROBE)
    code, _, err = torchrun(folder, [str(folder / "probe.py")])
    if code != 0:
        pytest.skip(f"this platform cannot start 2 gloo processes: {err.strip()[-300:]}")


def train(tmp_path, data_dir, run_name, nproc, *overrides, env=None):
    args = ["--dataset=ml-100k", f"--data_dir={data_dir}", f"--runs_dir={tmp_path / 'runs'}",
            f"--results_dir={tmp_path / 'results'}", "--download=False", "--progress=False",
            "--batch_size=500", "--dim=8", "--n_tastes=3", "--epochs=3", "--patience=0",
            "--threads=1", *([f"--run_name={run_name}"] if run_name else []), *overrides]
    if nproc == 1:
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        code, out, err = torchrun(tmp_path, [str(ROOT / "train.py"), *args], nproc, env)
    assert code == 0, err[-3000:]
    return out, err


def test_two_gloo_processes_match_one_process(tmp_path, synthetic_ml100k, gloo):
    train(tmp_path, synthetic_ml100k, "single", 1)
    train(tmp_path, synthetic_ml100k, "dual", 2)

    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["dual", "single"]
    dual_run = tmp_path / "runs" / "dual"
    assert len(list(dual_run.glob("events.out.tfevents.*"))) == 1  # rank 0 logs alone
    assert len(list(dual_run.glob("last_checkpoint_*.pt"))) == 1

    single = json.loads((tmp_path / "results" / "single" / "summary.json").read_text())
    dual = json.loads((tmp_path / "results" / "dual" / "summary.json").read_text())
    assert (dual["world_size"], dual["backend"]) == (2, "gloo")
    assert (single["world_size"], single["backend"]) == (1, "none")
    # Same global batch, same seed: the same model up to floating-point noise.
    assert abs(dual["test_mse"] - single["test_mse"]) < 1e-4, (dual["test_mse"], single["test_mse"])
    for a, b in zip(read_csv(tmp_path / "results" / "single" / "metrics.csv"),
                    read_csv(tmp_path / "results" / "dual" / "metrics.csv")):
        assert abs(float(a["val_mse"]) - float(b["val_mse"])) < 1e-4


def test_two_processes_resume(tmp_path, synthetic_ml100k, gloo):
    train(tmp_path, synthetic_ml100k, "dual", 2, "--lr_decay=0", "--implicit_share=1")  # a run that may go on
    code, _, err = torchrun(tmp_path, [str(ROOT / "train.py"), f"--resume={tmp_path / 'runs' / 'dual'}",
                                       "--epochs=4"])
    assert code == 0, err[-3000:]
    rows = read_csv(tmp_path / "results" / "dual" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_ranks_share_one_run_name_whatever_their_clocks_say(tmp_path, synthetic_ml100k, gloo):
    """Processes that read the clock on either side of a second boundary: rank 1's clock is set
    an hour ahead (a sitecustomize that only the workers load). One run, one folder, and the
    summary's test figures are those of the best epoch on every rank."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, time\n"
        "_rank = int(os.environ.get('LOCAL_RANK', '0'))\n"
        "_strftime = time.strftime\n"
        "def _ahead(fmt, t=None):\n"
        "    return _strftime(fmt, time.localtime(time.time() + 3600 * _rank) if t is None else t)\n"
        "time.strftime = _ahead\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    train(tmp_path, synthetic_ml100k, "", 2, env=env)
    [run] = list((tmp_path / "runs").iterdir())
    [results] = list((tmp_path / "results").iterdir())
    assert run.name == results.name and run.name.startswith("ml-100k-K3-")
    summary = json.loads((results / "summary.json").read_text())
    best = next(r for r in read_csv(results / "metrics.csv") if int(r["epoch"]) == summary["best_epoch"])
    assert abs(summary["test_mse"] - float(best["test_mse"])) < 1e-6


def test_a_rank_with_an_empty_share_of_the_last_batch(tmp_path, synthetic_ml100k, gloo):
    n_train = len(loader.split(len(mixture_ratings()[2]))[0])
    # Two batches, the second of one rating: rank 1's share of it is empty.
    out, _ = train(tmp_path, synthetic_ml100k, "short", 2, f"--batch_size={n_train - 1}", "--epochs=2")
    summary = json.loads((tmp_path / "results" / "short" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["test_mse"] < 2.0


def test_ranking_on_two_processes_matches_one(tmp_path, synthetic_ml100k, gloo):
    """The rank metrics are sums all-reduced across ranks, and each rank takes its share of
    every user batch: two processes give one process's figures."""
    ranking = ["--task=ranking", "--batch_size=32", "--epochs=2"]
    train(tmp_path, synthetic_ml100k, "single", 1, *ranking)
    train(tmp_path, synthetic_ml100k, "dual", 2, *ranking)
    single = json.loads((tmp_path / "results" / "single" / "summary.json").read_text())
    dual = json.loads((tmp_path / "results" / "dual" / "summary.json").read_text())
    assert dual["world_size"] == 2 and dual["n_users"] == single["n_users"]
    for key in ("test_ndcg@10", "test_recall@10", "val_ndcg@10", "val_mrr@10"):
        assert abs(dual[key] - single[key]) < 1e-4, (key, dual[key], single[key])


@pytest.mark.parametrize("bad", ["--n_tastes=0", "--no_such_knob=1", "--dataset=no-such-set"])
def test_bad_input_is_said_once_not_once_a_process(tmp_path, synthetic_ml100k, gloo, bad):
    """Every process reads the same command line and data: one line says what is wrong, from rank 0."""
    code, out, err = torchrun(tmp_path, [str(ROOT / "train.py"), f"--data_dir={synthetic_ml100k}",
                                         "--download=False", f"--runs_dir={tmp_path / 'runs'}",
                                         f"--results_dir={tmp_path / 'results'}", bad])
    assert code != 0
    assert err.count("error: ") == 1, err[-3000:]

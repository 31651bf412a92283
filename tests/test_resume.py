"""A run killed at any moment resumes to the figures of the same run never interrupted.

Each kill stops train.py at a chosen point of its own invocation (tests/faults.py: the n-th call
of a function, SIGKILL as kill -9 does or SIGINT as Ctrl-C does): in a training step, in an
evaluation, between a checkpoint's temporary file and its rename, in the end-of-run pictures and
results. After every kill the run is resumed; the last resume ends it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SETTINGS = {"rating": ["--batch_size=512", "--dim=8", "--n_tastes=3", "--epochs=4", "--patience=0"],
            "ranking": ["--task=ranking", "--batch_size=32", "--dim=8", "--epochs=4", "--eval_every=2",
                        "--patience=0"]}
# Points in the invocation that each kill stops, counted from that invocation's start (each
# invocation first renames its config.json into place). Rating: 9 steps an epoch, every epoch
# evaluated, then its best model and its checkpoint renamed into place; the end writes
# dataset.npz, metrics.csv and summary.json. Ranking: 4 steps an epoch, evaluated at epochs 2, 4.
KILLS = {
    "rating": [("train_step:5:SIGKILL", -9),         # epoch 1: no checkpoint yet
               ("os.replace:3:SIGKILL", -9),         # epoch 1's checkpoint being renamed into place
               ("evaluate_step:2:SIGINT", 130),      # in epoch 1's evaluation
               ("os.replace:5:SIGKILL", -9),         # epoch 2's best model written, its checkpoint not
               ("train_step:12:SIGINT", 130),        # resumed after epoch 1: in epoch 3
               ("run_pictures:1:SIGKILL", -9),       # every epoch done, in the end's pictures
               ("write_results:1:SIGINT", 130),      # the end again, writing the results
               ("os.replace:4:SIGKILL", -9)],        # the end again, summary.json being renamed
    "ranking": [("os.replace:2:SIGKILL", -9),        # epoch 1's checkpoint (no evaluation yet)
                ("train_step:6:SIGINT", 130),        # epoch 2, before the first evaluation
                ("evaluate_step:1:SIGKILL", -9),     # resumed after epoch 1: epoch 2's evaluation
                ("os.replace:3:SIGKILL", -9),        # epoch 2's best model written, its checkpoint not
                ("write_projector:1:SIGINT", 130),   # the end, TensorBoard's projector
                ("finish:1:SIGKILL", -9)],           # the end again
}


def invoke(tmp_path, point, args):
    return subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), point, *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def common(tmp_path, data_dir, task):
    return [f"--data_dir={data_dir}", "--dataset=ml-100k", "--download=False", "--progress=False",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}", *SETTINGS[task]]


def figures(tmp_path, name):
    summary = json.loads((tmp_path / "results" / name / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k.startswith(("test_", "val_")) or k == "best_epoch"}


def killed_and_resumed(tmp_path, data_dir, task, kills):
    """The run through every (point, expected exit status) of kills, each in a new invocation
    resumed from what the last one left; then a last resume. Returns its test figures."""
    args = common(tmp_path, data_dir, task)
    resume = [f"--resume={tmp_path / 'runs' / 'killed'}"]
    for n, (point, status) in enumerate(kills):
        done = invoke(tmp_path, point, args + ["--run_name=killed"] if n == 0 else resume)
        assert done.returncode == status, (point, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (point, done.stderr[-2000:])
    done = invoke(tmp_path, "count:finish", resume)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "runs" / "killed"
    assert len(list(run_dir.glob("best_*.pt"))) == 1 and len(list(run_dir.glob("last_checkpoint_*.pt"))) == 1
    assert not list(run_dir.glob(".*.tmp")), "a temporary file of a killed write was left"
    return figures(tmp_path, "killed")


@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_a_run_killed_at_chosen_points_resumes_to_the_uninterrupted_figures(tmp_path, synthetic_ml100k, task):
    import train
    assert train.main(common(tmp_path, synthetic_ml100k, task) + ["--run_name=straight"]) == 0  # in this process
    straight = figures(tmp_path, "straight")
    killed = killed_and_resumed(tmp_path, synthetic_ml100k, task, KILLS[task])
    assert killed.keys() == straight.keys()
    for key, value in straight.items():
        assert killed[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.skipif(not os.environ.get("RESUME_SOAK"), reason="a soak: RESUME_SOAK=<runs> turns it on")
@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_figures(tmp_path, synthetic_ml100k, task):
    """RESUME_SOAK=<n>: n runs, each killed 3-6 times at points drawn from the counts of an
    uninterrupted run's own calls (seeded by the run's number)."""
    done = invoke(tmp_path, "count:train_step,evaluate_step,os.replace,finish,run_pictures,write_results",
                  common(tmp_path, synthetic_ml100k, task) + ["--run_name=straight"])
    counts = json.loads(done.stdout.split("COUNTS ")[-1])
    straight = figures(tmp_path, "straight")
    for seed in range(int(os.environ["RESUME_SOAK"])):
        rng = np.random.default_rng(seed)
        names = sorted(counts)
        kills = [(f"{name}:{rng.integers(1, counts[name] + 1)}:{rng.choice(['SIGKILL', 'SIGINT'])}", None)
                 for name in rng.choice(names, size=rng.integers(3, 7))]
        here = tmp_path / f"soak{seed}"
        here.mkdir()
        args = common(here, synthetic_ml100k, task)
        resume = [f"--resume={here / 'runs' / 'killed'}"]
        for n, (point, _) in enumerate(kills):
            run = invoke(here, point, args + ["--run_name=killed"] if n == 0 else resume)
            # A point past what this invocation still had to do lets it finish (0).
            assert run.returncode in (0, 130, -9), (seed, point, run.stderr[-2000:])
            assert "Traceback" not in run.stderr, (seed, point, run.stderr[-2000:])
        run = invoke(here, "count:finish", resume)
        assert run.returncode == 0, (seed, kills, run.stderr[-2000:])
        for key, value in straight.items():
            assert figures(here, "killed")[key] == pytest.approx(value, abs=1e-6), (seed, kills, key)


def test_a_run_killed_before_its_settings_were_saved_says_so_and_its_name_is_free(tmp_path, synthetic_ml100k):
    import loader
    loader.load("ml-100k", synthetic_ml100k)  # the parse cache written: the first rename is config.json's
    args = common(tmp_path, synthetic_ml100k, "rating") + ["--run_name=early"]
    assert invoke(tmp_path, "os.replace:1:SIGKILL", args).returncode == -9
    resumed = invoke(tmp_path, "count:finish", [f"--resume={tmp_path / 'runs' / 'early'}"])
    assert resumed.returncode == 2 and "before its settings were saved" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert invoke(tmp_path, "count:finish", args).returncode == 0  # the same command starts it afresh


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_run_resumes_from_the_last_one(
        tmp_path, synthetic_ml100k, monkeypatch, capsys):
    """torch.save meets a full disk as its zip writer's RuntimeError: once a traceback of 40
    lines; now one line that says which file, the disk's free space and how to go on."""
    import torch

    import runs
    import train
    real_save, calls = torch.save, []

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 4:  # epoch 2's files: epoch 1's best model and checkpoint are written
            Path(f).write_bytes(b"PK\x03\x04 cut short")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3136 vs 3030")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    run_dir = tmp_path / "runs" / "full"
    assert train.main(common(tmp_path, synthetic_ml100k, "rating") + ["--run_name=full"]) == 2
    said = capsys.readouterr().err
    assert said.count("error: cannot write") == 1 and "MiB free on its disk" in said, said
    assert "unexpected pos" in said and f"--resume={run_dir}" in said and "Traceback" not in said
    assert [p.name for p in runs.last_checkpoints(run_dir)] == ["last_checkpoint_1.pt"]
    assert not list(run_dir.glob(".*.tmp"))  # the file cut short is gone
    monkeypatch.setattr(torch, "save", real_save)
    assert train.main([f"--resume={run_dir}"]) == 0
    assert figures(tmp_path, "full")["best_epoch"] >= 1


# tensorboardX's writer thread meets a full disk at its n-th record (train.py in a subprocess:
# before the fix, the run hung there for good, which the subprocess's timeout turns into a failure).
EVENTS_ON_A_FULL_DISK = """
import errno, sys
sys.path.insert(0, {root!r})
import tensorboardX.record_writer as record_writer
real_write, calls = record_writer.RecordWriter.write, []

def write(self, data):
    calls.append(1)
    if len(calls) >= {nth}:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(self, data)

record_writer.RecordWriter.write = write
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("nth", [3, 40])  # in epoch 1 (no checkpoint yet); after epoch 1's checkpoint
def test_a_full_disk_under_tensorboards_events_is_one_line_not_a_hang(tmp_path, synthetic_ml100k, nth):
    """tensorboardX writes events from a thread: a failed write there printed that thread's
    traceback, then add_scalar waited forever on the full queue. Now one line, exit 2, the
    checkpoints kept, and the run resumes."""
    args = common(tmp_path, synthetic_ml100k, "rating") + ["--run_name=events", "--log_interval=2"]
    failed = subprocess.run([sys.executable, "-c", EVENTS_ON_A_FULL_DISK.format(root=str(ROOT), nth=nth), *args],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "events"
    assert failed.returncode == 2, failed.stderr
    said = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and f"cannot write TensorBoard's events in {run_dir}" in said[0], failed.stderr
    assert "No space left on device" in said[0] and f"--resume={run_dir}" in said[0]
    assert "Traceback" not in failed.stderr and "Exception" not in failed.stderr, failed.stderr
    resumed = invoke(tmp_path, "count:finish", [f"--resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr
    assert figures(tmp_path, "events")["best_epoch"] >= 1


def test_a_full_disk_under_the_results_leaves_no_half_picture_and_the_run_finishes_on_resume(
        tmp_path, synthetic_ml100k, monkeypatch, capsys):
    """A disk that filled while a picture was written left its first bytes as the picture and
    said only "[Errno 28] No space left on device". Now the picture is whole or absent and the
    line names it and the --resume that finishes the run."""
    import errno

    import train
    real_write_bytes = Path.write_bytes

    def write_bytes_on_a_full_disk(self, data):  # the pictures' bytes meet the full disk
        if ".svg." not in self.name:
            return real_write_bytes(self, data)
        real_write_bytes(self, b"<svg cut short")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_bytes_on_a_full_disk)
    run_dir, results = tmp_path / "runs" / "pictures", tmp_path / "results" / "pictures"
    assert train.main(common(tmp_path, synthetic_ml100k, "rating") + ["--run_name=pictures"]) == 2
    said = capsys.readouterr().err
    assert said.count("error: cannot write") == 1 and "Traceback" not in said, said
    assert f"cannot write {results / 'taste_weights.svg'} (No space left on device" in said, said
    assert f"--resume={run_dir}" in said
    assert list(results.iterdir()) == []  # neither the picture cut short nor its temporary file
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    assert train.main([f"--resume={run_dir}"]) == 0
    assert {"taste_weights.svg", "item_map.svg", "summary.json"} <= {p.name for p in results.iterdir()}

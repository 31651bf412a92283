"""Train a mixture-of-tastes model on MovieLens ratings.

    python train.py                                     # defaults below
    python train.py --dataset=ml-100k --epochs=5 --run_name=try
    python train.py --resume=runs/try --epochs=10       # continue a run where it stopped
    torchrun --nproc_per_node=2 train.py                # several processes (see README)

Every hyperparameter is a constant just below; any of them can be overridden as --key=value.
TensorBoard curves and checkpoints go to runs/<run_name>/, the final figures to
results/<run_name>/ (summary.json, metrics.csv, two SVG plots).
"""

import ast
import csv
import ctypes
import gc
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import ignite
import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import (
    Checkpoint,
    DiskSaver,
    EarlyStopping,
    ProgressBar,
    TerminateOnNan,
    global_step_from_engine,
)
from ignite.handlers.tensorboard_logger import TensorboardLogger
from ignite.metrics import Average, MeanAbsoluteError, MeanSquaredError, RootMeanSquaredError

import loader
from MFMixTaste import PRIOR_TERMS, MFMixTaste

# -----------------------------------------------------------------------------
# data
dataset = "ml-1m"          # MovieLens variant: ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m, ml-latest-small
data_dir = "data"          # folder holding <dataset>.zip or its extracted folder; downloads go here
download = True            # download from GroupLens when no local copy is found
test_fraction = 0.25       # rows held out for test, drawn as the replaced script did (seed 42, in file order)
val_fraction = 0.05        # share of the training rows held out for early stopping and model choice
split_seed = 42            # seed of the train/test and train/val splits (42 = the replaced script's split)
# model
dim = 32                   # latent dimension d of tastes, attention and item vectors
n_tastes = 2               # tastes per user, K (1 = biased matrix factorisation)
init_std = 0.01            # std of the factors at start (see MFMixTaste.__init__)
# L2 prior, per rating: loss = MSE + sum of weight * mean squared norm of the rows the batch uses
prior_tastes = 0.03        # on the users' taste vectors U
prior_attention = 0.03     # on the users' attention vectors A
prior_items = 0.03         # on the item vectors e
prior_biases = 0.0         # on user and item biases
# optimisation
lr = 5e-3                  # Adam learning rate
batch_size = 8192          # ratings per step (the global batch, whatever the number of processes)
epochs = 30                # most epochs to run
patience = 2               # early stopping: epochs without a better validation MSE before stopping
clip_predictions = True    # clamp evaluated predictions to the training set's rating range
eval_train = False         # training-set metrics from a full pass after each epoch (else, free, from the epoch's own batches)
eval_batch_size = 16384    # ratings per evaluation batch (16384 keeps its temporaries under 32 MB, see keep_freed_memory)
# system
seed = 0                   # seeds initialisation and shuffling; the same seed gives the same run
device = "auto"            # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
threads = 0                # CPU threads for torch (0 = torch's default)
# logging and output
log_interval = 10          # log the training loss and prior terms every this many iterations
run_name = ""              # runs/<run_name>/ and results/<run_name>/ ("" = dataset, K and a timestamp)
runs_dir = "runs"          # TensorBoard events, checkpoints and config of each run
results_dir = "results"    # summary.json, metrics.csv and plots of each finished run
resume = ""                # a run folder (runs/<name>) to continue from its last checkpoint
progress = True            # show Ignite's progress bar
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))}

# What a resumed run may change; the rest is fixed by its checkpoint and saved config.
CHANGEABLE_ON_RESUME = {"resume", "epochs", "patience", "data_dir", "download", "device",
                        "threads", "log_interval", "progress", "eval_train", "eval_batch_size",
                        "results_dir"}


class ConfigError(Exception):
    """A bad command line or run folder: the message says which key or path."""


class TrainingError(Exception):
    """Training itself failed (the loss diverged): the message says when and what was kept."""


def parse_overrides(argv, defaults):
    """--key=value pairs -> {key: value}, typed like the default; unknown keys are errors."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments are --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown hyperparameter {key!r}; valid keys: {', '.join(defaults)}")
        overrides[key] = _typed(key, text, defaults[key])
    return overrides


def _typed(key, text, default):
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} takes True or False, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"--{key} takes a {type(default).__name__}, got {text!r}")
    return value


def check(cfg):
    """Values that would fail later, refused before anything runs."""
    positive = ("dim", "n_tastes", "batch_size", "epochs", "eval_batch_size", "log_interval", "lr")
    for key in positive:
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    for key in ("patience", "threads", "init_std") + tuple(k for k in cfg if k.startswith("prior_")):
        if cfg[key] < 0:
            raise ConfigError(f"--{key} must not be negative, got {cfg[key]}")
    if not 0 < cfg["test_fraction"] < 1 or not 0 < cfg["val_fraction"] < 1:
        raise ConfigError("--test_fraction and --val_fraction must lie strictly between 0 and 1")
    if cfg["device"] != "auto":
        try:
            torch.device(cfg["device"])
        except RuntimeError:
            raise ConfigError(f"--device={cfg['device']} is not a device: use auto, cpu, cuda or "
                              "cuda:<index>") from None


def resolve_config(argv):
    """Defaults, then the resumed run's saved config, then the command line."""
    overrides = parse_overrides(argv, DEFAULTS)
    cfg = dict(DEFAULTS)
    if overrides.get("resume"):
        run_dir = Path(overrides["resume"])
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume={run_dir}: no run there ({saved} is missing)")
        try:
            cfg.update({k: v for k, v in json.loads(saved.read_text()).items() if k in DEFAULTS})
        except (ValueError, AttributeError):
            raise ConfigError(f"--resume={run_dir}: {saved} is not a valid config file") from None
        fixed = sorted(k for k, v in overrides.items()
                       if k not in CHANGEABLE_ON_RESUME and v != cfg[k])
        if fixed:
            raise ConfigError(f"--resume={run_dir}: {', '.join(fixed)} cannot change when resuming "
                              "(the checkpoint fixes them); start a new run instead")
        cfg["run_name"], cfg["runs_dir"] = split_run_path(run_dir, cfg["run_name"])
    cfg.update(overrides)
    check(cfg)
    return cfg


def split_run_path(run_dir, saved_name):
    """A run folder -> (run_name, runs_dir). The saved name may have several parts (exp/a): it is
    kept when the folder's path ends with it, so results go to results/exp/a as before; a folder
    moved or renamed since is named after its last part."""
    name_parts = Path(saved_name).parts
    if name_parts and run_dir.parts[-len(name_parts):] == name_parts:
        return saved_name, str(Path(*run_dir.parts[:-len(name_parts)] or ["."]))
    return run_dir.name, str(run_dir.parent)


def decide_run_name(cfg):
    """--run_name, else dataset, K and a timestamp, decided by rank 0 alone: each process
    reading its own clock could cross a second boundary and name a different run."""
    if cfg["run_name"]:
        return cfg["run_name"]
    name = f"{cfg['dataset']}-K{cfg['n_tastes']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return idist.broadcast(name, src=0) if idist.get_world_size() > 1 else name


SPLITS = ("train", "val", "test")
METRICS = ("mse", "rmse", "mae")


class History:
    """Per-epoch metrics and accumulated wall time, saved with the checkpoints so that a resumed
    run writes one complete metrics.csv."""

    def __init__(self):
        self.rows, self.wall_seconds = [], 0.0

    def state_dict(self):
        return {"rows": self.rows, "wall_seconds": self.wall_seconds}

    def load_state_dict(self, state):
        self.rows, self.wall_seconds = list(state["rows"]), float(state["wall_seconds"])


def keep_freed_memory():
    """Ask glibc to keep freed memory in the heap instead of returning it to the OS at once.

    Each step allocates and frees batch-sized temporaries of several MB. By default glibc
    hands those back to the kernel and the next step faults them in again, page by page:
    on ML-1M that was 24 s of system time in a 40 s run; with this, 1.8 s in a 25 s run.
    Only process-local allocator settings change; elsewhere than glibc it does nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed: blocks < 32 MB from the heap
    mallopt(m_trim_threshold, 1 << 30)   # shrink the heap only past 1 GB of free top
    mallopt(m_top_pad, 64 << 20)         # grow it 64 MB at a time


def pick_device(name):
    if name == "auto" or (name == "cuda" and idist.get_world_size() > 1):
        return idist.device()  # cuda:<local rank> when CUDA is there, else cpu
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available on this machine")
    return device


def make_evaluator(model, rating_range, device):
    low, high = rating_range

    def evaluate_step(engine, batch):
        model.eval()
        users, items, ratings, _ = batch
        with torch.no_grad():
            predictions = model(users, items)
        if low is not None:
            predictions = predictions.clamp(low, high)
        return predictions, ratings

    evaluator = Engine(evaluate_step)
    attach_metrics(evaluator, lambda output: output, device)
    return evaluator


def attach_metrics(engine, output_transform, device):
    """MSE, RMSE and MAE of (predictions, targets) as engine.state.metrics[name], names as in
    METRICS. Ignite's metrics reduce their sums across processes, so each rank feeds its share."""
    MeanSquaredError(output_transform, device=device).attach(engine, "mse")
    RootMeanSquaredError(output_transform, device=device).attach(engine, "rmse")
    MeanAbsoluteError(output_transform, device=device).attach(engine, "mae")


def training(local_rank, cfg):
    started = time.perf_counter()
    keep_freed_memory()
    rank, world_size = idist.get_rank(), idist.get_world_size()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    cfg["run_name"] = decide_run_name(cfg)
    run_dir = Path(cfg["runs_dir"]) / cfg["run_name"]
    results = Path(cfg["results_dir"]) / cfg["run_name"]
    if not cfg["resume"]:
        check_new_run_folder(run_dir)
    idist.barrier()  # every rank has looked before rank 0 touches the folder
    if rank == 0 and not last_checkpoints(run_dir):
        for path in unstarted_run_files(run_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    # Data: rank 0 downloads and parses (and fills the cache) while the others wait for it.
    with idist.one_rank_first():
        ratings = loader.load(cfg["dataset"], cfg["data_dir"], cfg["download"],
                              progress=cfg["progress"] and rank == 0)
    train_rows, val_rows, test_rows = loader.split(len(ratings), cfg["test_fraction"],
                                                   cfg["val_fraction"], cfg["split_seed"])
    tensors = {name: ratings.tensors(rows, device)
               for name, rows in zip(SPLITS, (train_rows, val_rows, test_rows))}
    train_ratings = ratings.ratings[train_rows]
    rating_range = ((float(train_ratings.min()), float(train_ratings.max()))
                    if cfg["clip_predictions"] else (None, None))

    torch.manual_seed(cfg["seed"])  # same initial model on every rank
    model = MFMixTaste(ratings.n_users, ratings.n_items, dim=cfg["dim"],
                       n_tastes=cfg["n_tastes"], global_mean=float(train_ratings.mean()),
                       init_std=cfg["init_std"])
    model = idist.auto_model(model)  # moves to the device; DistributedDataParallel if world > 1
    # Adam for the whole model: the fused kernel updates the dense tables in one pass per step
    # (on CPU as on GPU); with batches of 8192 ratings, a dense update costs less than the
    # bookkeeping of sparse ones (SparseAdam measured 1.3x slower per epoch on ML-1M).
    optimizer = idist.auto_optim(torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=True))
    prior_weights = torch.tensor([cfg[f"prior_{name}"] for name in PRIOR_TERMS], device=device)

    batches = loader.BatchIterator(tensors["train"], cfg["batch_size"], seed=cfg["seed"],
                                   rank=rank, world_size=world_size)

    def train_step(engine, batch):
        model.train()
        users, items, targets, global_batch = batch
        predictions, squared_norms = model(users, items, return_prior=True)
        # A rank's share of a short last batch can be empty: its loss is then 0, not NaN.
        mse = (predictions - targets).pow(2).sum() / max(len(targets), 1)
        prior_by_term = squared_norms * prior_weights                   # (4,), as in PRIOR_TERMS
        # Each rank holds len(targets) of the global batch; DistributedDataParallel averages
        # gradients over ranks, so this weight makes the update that of the whole batch.
        share = len(targets) * world_size / global_batch
        loss = mse + prior_by_term.sum()
        optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        optimizer.step()
        return {"loss": loss.detach(), "mse": mse.detach(), "prior": prior_by_term.detach(),
                "predictions": predictions.detach(), "targets": targets}

    trainer = Engine(train_step)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(lambda out: out["loss"]))
    # TerminateOnNan stops mid-epoch, but Ignite still fires EPOCH_COMPLETED: the handlers of
    # that event below skip a diverged epoch, so no NaN model is evaluated or saved.
    epoch_completed = Events.EPOCH_COMPLETED(event_filter=lambda engine, _: not diverged(engine))
    Average(output_transform=lambda out: out["loss"], device=device).attach(trainer, "loss")
    # Training-set metrics over the epoch's own batches, as the model learns (free); with
    # eval_train, a separate pass over the training set after the epoch replaces them.
    attach_metrics(trainer, lambda out: (out["predictions"], out["targets"]), device)

    evaluators = {split: make_evaluator(model, rating_range, device) for split in SPLITS}
    eval_batches = {split: loader.BatchIterator(tensors[split], cfg["eval_batch_size"],
                                                shuffle=False, rank=rank, world_size=world_size)
                    for split in SPLITS}
    history = History()

    @trainer.on(epoch_completed)
    def evaluate(engine):
        # Ignite's own timing of the epoch's steps, read before the evaluation below adds to it.
        epoch_seconds = engine.state.times[Events.EPOCH_COMPLETED.name]
        row = {"epoch": engine.state.epoch, "train_loss": engine.state.metrics["loss"],
               "epoch_seconds": round(epoch_seconds, 3)}
        for split in SPLITS:
            if split == "train" and not cfg["eval_train"]:
                metrics = engine.state.metrics
            else:
                evaluators[split].run(eval_batches[split])
                metrics = evaluators[split].state.metrics
            row.update({f"{split}_{m}": metrics[m] for m in METRICS})
        history.rows.append(row)

    # Model choice and early stopping look at the validation MSE only, never at the test set.
    def neg_val_mse(_):
        return -evaluators["val"].state.metrics["mse"]

    best_checkpoint = Checkpoint(
        {"model": model}, DiskSaver(run_dir, require_empty=False), filename_prefix="best",
        score_function=neg_val_mse, score_name="neg_val_mse", n_saved=1,
        global_step_transform=global_step_from_engine(trainer))
    evaluators["val"].add_event_handler(Events.COMPLETED, best_checkpoint)
    stopper = EarlyStopping(cfg["patience"], neg_val_mse, trainer) if cfg["patience"] else None
    if stopper:
        evaluators["val"].add_event_handler(Events.COMPLETED, stopper)

    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "batches": batches,
               "history": history, "best_checkpoint": best_checkpoint}
    if stopper:
        to_save["early_stopping"] = stopper
    # Named by epoch (last_checkpoint_<epoch>.pt): resume takes the highest epoch, whatever
    # the files' times say.
    last_checkpoint = Checkpoint(to_save, DiskSaver(run_dir, require_empty=False),
                                 filename_prefix="last", n_saved=1,
                                 global_step_transform=global_step_from_engine(trainer))

    @trainer.on(epoch_completed)
    def save_last(engine):
        history.wall_seconds = wall_before + time.perf_counter() - started
        last_checkpoint(engine)
        if rank == 0:  # the one checkpoint of an earlier invocation, now superseded
            for path in last_checkpoints(run_dir)[:-1]:
                path.unlink(missing_ok=True)

    if cfg["resume"]:
        saved = last_checkpoints(run_dir)
        if saved:
            state = read_checkpoint(saved[-1])
            # A knob added on resume (patience 0 -> 2) has no saved state: it starts fresh.
            Checkpoint.load_objects({k: v for k, v in to_save.items() if k in state}, state)
        elif rank == 0:
            print(f"{run_dir} has no checkpoint yet (it stopped in its first epoch): starting it "
                  "from epoch 1")
    wall_before = history.wall_seconds  # of earlier invocations, when resuming

    left = epochs_left(trainer, stopper, cfg)
    # Rank 0 decides for all: only its disk surely holds the results folder.
    finished = idist.broadcast(int(left is not None and (results / "summary.json").is_file()), src=0)
    if finished:
        if rank == 0:
            print(f"nothing to do: {run_dir} {left}; its results are in {results}/")
        return

    tb_logger = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tb_logger = attach_tensorboard(run_dir, trainer, evaluators, optimizer, cfg)
        if cfg["progress"] and left is None:
            ProgressBar(persist=False).attach(
                trainer, output_transform=lambda out: {"loss": out["loss"]})

    if left is None:
        trainer.run(batches, max_epochs=cfg["epochs"])
    if diverged(trainer):
        if tb_logger:
            tb_logger.close()
        kept = (f"the checkpoint of epoch {trainer.state.epoch - 1} is kept in {run_dir}"
                if last_checkpoints(run_dir) else f"no epoch finished, {run_dir} holds no checkpoint")
        raise TrainingError(f"training diverged: the loss became {float(trainer.state.output['loss'])} "
                            f"in epoch {trainer.state.epoch} (iteration {trainer.state.iteration}); "
                            f"nothing of that epoch was saved and {kept}. Lower --lr or raise the "
                            "prior weights, and start a new run.")

    # Final figures: the best-by-validation model on every split. Rank 0 reads it and sends it
    # to the others, so every rank evaluates the same model even without a shared disk.
    if rank == 0:
        Checkpoint.load_objects({"model": model}, read_checkpoint(best_checkpoint.last_checkpoint))
    if world_size > 1:
        for tensor in model.state_dict().values():
            idist.broadcast(tensor, src=0)
    final_evaluator, final = make_evaluator(model, rating_range, device), {}
    for split in ("test", "val", "train"):  # test first: the figures summary.json leads with
        final_evaluator.run(eval_batches[split])
        final.update({f"{split}_{m}": final_evaluator.state.metrics[m] for m in METRICS})
    best_epoch = max(history.rows, key=lambda r: -r["val_mse"])["epoch"]
    if rank == 0:
        summary = {**final,
                   "best_epoch": best_epoch, "epochs_run": trainer.state.epoch,
                   "wall_seconds": round(wall_before + time.perf_counter() - started, 2),
                   "dataset": cfg["dataset"], "n_users": ratings.n_users,
                   "n_items": ratings.n_items, "n_train": len(train_rows),
                   "n_val": len(val_rows), "n_test": len(test_rows),
                   "world_size": world_size, "backend": idist.backend() or "none",
                   "device": str(device), "torch": torch.__version__,
                   "ignite": ignite.__version__, "hyperparameters": cfg}
        write_results(results, summary, history.rows)
        tb_logger.writer.add_hparams(
            {k: v for k, v in cfg.items() if k not in ("resume",)},
            {f"hparam/{k}": v for k, v in final.items()}, name="hparams")
        tb_logger.close()
        print(f"test MSE {final['test_mse']:.4f} RMSE {final['test_rmse']:.4f} "
              f"MAE {final['test_mae']:.4f} (best epoch {best_epoch} of {trainer.state.epoch}, "
              f"val MSE {final['val_mse']:.4f}); results in {results}/")
    # Let every rank leave together, before run_released (main) releases the model and engines
    # and Parallel destroys the process group.
    idist.barrier()


def diverged(trainer):
    """Whether the last training step's loss is NaN or infinite (TerminateOnNan then stopped)."""
    output = trainer.state.output
    return output is not None and not math.isfinite(float(output["loss"]))


def epochs_left(trainer, stopper, cfg):
    """None when a (resumed) trainer has epochs to run, else why it has none, in words."""
    done = trainer.state.epoch
    if done >= cfg["epochs"]:
        return (f"has trained {done} epochs and --epochs={cfg['epochs']}: pass a larger "
                "--epochs to train further")
    if stopper and done and stopper.counter >= stopper.patience:
        return (f"stopped early after epoch {done} (no better validation MSE in "
                f"{stopper.patience} epochs): pass a larger --patience to train further")
    return None


def last_checkpoints(run_dir):
    """The run's last_checkpoint_<epoch>.pt files, oldest epoch first."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("last_checkpoint_*.pt")
             if (m := re.fullmatch(r"last_checkpoint_(\d+)\.pt", path.name))]
    return [path for _, path in sorted(found)]


def read_checkpoint(path):
    """A checkpoint's objects, on the CPU: Checkpoint.load_objects then copies each into its
    place on the device (model parameters and optimiser state), while the shuffling generator's
    state must stay a CPU tensor. A damaged file is named in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, bad pickle, wrong file: torch raises many kinds
        raise ConfigError(f"{path} is damaged or not a checkpoint ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'}); "
                          "restore it from a copy, or delete the run folder and start again") from None


def unstarted_run_files(run_dir):
    """What a run that never finished an epoch (Ctrl-C, or NaN in epoch 1) left in its folder:
    its config and first events. A new run, or a resume, clears them and starts in that folder."""
    if not run_dir.is_dir() or last_checkpoints(run_dir):
        return []
    return [path for path in run_dir.iterdir()
            if path.name in ("config.json", "hparams")
            or path.name.startswith(("events.out.tfevents.", "best_"))]


def check_new_run_folder(run_dir):
    """A new run may use an absent or empty folder, or one that an unstarted run left; never one
    that holds a run (it would be overwritten) or files that are not a run's."""
    if last_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run: continue it with --resume={run_dir} "
                          "or pick another --run_name")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder: pick another --run_name")
    ours = set(unstarted_run_files(run_dir))
    others = sorted(p.name for p in run_dir.iterdir() if p not in ours) if run_dir.is_dir() else []
    if others:
        raise ConfigError(f"{run_dir} holds files that are not a run's ({', '.join(others[:3])}): "
                          "pick another --run_name")


def attach_tensorboard(run_dir, trainer, evaluators, optimizer, cfg):
    """tensorboardX through Ignite's TensorboardLogger: loss, MSE and each prior term every
    log_interval iterations, the metrics of every split each epoch, the hyperparameters."""
    tb_logger = TensorboardLogger(log_dir=str(run_dir))

    def scalars(out):
        values = {"loss": float(out["loss"]), "mse": float(out["mse"])}
        values.update({f"prior_{n}": float(v) for n, v in zip(PRIOR_TERMS, out["prior"])})
        return values

    tb_logger.attach_output_handler(trainer, Events.ITERATION_COMPLETED(every=cfg["log_interval"]),
                                    tag="train_step", output_transform=scalars)
    tb_logger.attach_opt_params_handler(trainer, Events.EPOCH_STARTED, optimizer)
    for split, evaluator in evaluators.items():
        if split == "train" and not cfg["eval_train"]:
            tb_logger.attach_output_handler(trainer, Events.EPOCH_COMPLETED, tag=split,
                                            metric_names=list(METRICS))
            continue
        tb_logger.attach_output_handler(evaluator, Events.COMPLETED, tag=split,
                                        metric_names=list(METRICS),
                                        global_step_transform=global_step_from_engine(trainer))
    tb_logger.writer.add_text("config", "    " + json.dumps(cfg, indent=2).replace("\n", "\n    "))
    return tb_logger


def write_results(folder, summary, rows):
    """summary.json, metrics.csv (one row per epoch) and the two SVG plots."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib  # imported here: only the end of a run needs it
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    epochs_axis = [r["epoch"] for r in rows]
    for split, title in (("train", "Training MSE"), ("test", "Test MSE")):
        key = f"{split}_mse"
        if not any(key in r for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs_axis, [r.get(key, np.nan) for r in rows], marker="o", markersize=3)
        ax.axvline(summary["best_epoch"], color="grey", linestyle=":", label="best epoch (val)")
        ax.set(xlabel="epoch", ylabel="MSE", title=f"{title}: {summary['dataset']}, "
               f"K={summary['hyperparameters']['n_tastes']}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{split}_mse.svg")
        plt.close(fig)


def main(argv):
    try:
        cfg = resolve_config(argv)
    except (ConfigError, loader.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    backend = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo"
    with idist.Parallel(backend=backend) as parallel:
        error = run_released(parallel, cfg)
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        print("interrupted: the checkpoint of the last finished epoch is kept; continue with "
              "--resume=<run folder>", file=sys.stderr)
        return 130
    print(f"error: {error}", file=sys.stderr)
    return 1 if isinstance(error, TrainingError) else 2


def run_released(parallel, cfg):
    """Run training() and release everything it built before Parallel's exit destroys the
    process group; returns the expected error (bad input, divergence, Ctrl-C) or None.

    The engines, their handlers and the DistributedDataParallel model form reference cycles
    that outlive training(), and an error's traceback holds its frames. Left to the collector
    at interpreter exit, they drop the last references to gloo's process group and to tensors
    its worker threads hold while Python finalizes; a worker that then needs the GIL is killed
    and the rank aborts ("terminate called without an active exception", exit code -6).
    Dropping the traceback and collecting here ends them while everything is still alive."""
    try:
        parallel.run(training, cfg)
        return None
    except (ConfigError, loader.DataError, TrainingError, KeyboardInterrupt) as error:
        error.__traceback__ = error.__context__ = error.__cause__ = None
        return error
    finally:
        gc.collect()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What a run is on disk: its settings (the command line, config.json), its folders, checkpoints,
TensorBoard events and results, and what a finished run leaves for recommend.py.

    runs/<run_name>/     TensorBoard events, config.json, last_checkpoint_<epoch>.pt, best_model_*.pt,
                         dataset.npz (raw ids, each user's rated items), items.json
    results/<run_name>/  metrics.csv, SVG plots and pictures, summary.json (written last: a run
                         that has it is finished, one that has not is resumable)
"""

import ast
import contextlib
import csv
import ctypes
import gc
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Events
from ignite.handlers import DiskSaver, global_step_from_engine
from ignite.handlers.tensorboard_logger import TensorboardLogger

import loader
import pictures
from files import TEMPORARY, write_atomically
from MFMixTaste import PRIOR_TERMS
from tasks import LOSSES


class ConfigError(Exception):
    """A bad command line or run folder: the message says which key or path."""


class TrainingError(Exception):
    """Training itself failed (the loss diverged): the message says when and what was kept."""


class _QuietEngineExceptions(logging.Filter):
    """Drops Ignite's "Engine run is terminating due to exception: ..." notices. Every exception
    that ends a run reaches train.py's main(), which reports it once (a line, or a traceback for a
    bug); the notice said it again, once per engine it passed through (Ctrl-C in an evaluation, a
    tune.py trial pruned from the validation evaluator inside the trainer)."""

    def filter(self, record):
        return "terminating due to exception" not in record.getMessage()


QUIET_ENGINE_EXCEPTIONS = _QuietEngineExceptions()  # on train.py's trainer (its evaluators share the logger)

def keep_freed_memory():
    """Ask glibc to keep freed memory in the heap instead of returning it to the OS at once.

    Each step allocates and frees batch-sized temporaries of several MB, and gradients the size
    of the embedding tables. By default glibc hands those back to the kernel and the next step
    faults them in again, page by page: on ML-1M that was 24 s of system time in a 40 s run;
    with this, 1.8 s in a 25 s run.
    Only process-local allocator settings change; elsewhere than glibc it does nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed: blocks < 32 MB from the heap
    # Blocks above that threshold were still mapped afresh and unmapped each step: at ML-25M's
    # size the embedding tables' gradients (83 MB a step) faulted in page by page, 2 minutes of
    # system time in a one-epoch rating run (epoch 115 s; with the heap only, 69 s).
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)   # shrink the heap only past 1 GB of free top
    mallopt(m_top_pad, 64 << 20)         # grow it 64 MB at a time


PRIOR_PER = ("row", "pair")  # train.py's prior_per
MIXED_PRECISION = ("auto", "bfloat16", "off")  # train.py's mixed_precision

# What a resumed run may change; the rest is fixed by its checkpoint and saved config.
CHANGEABLE_ON_RESUME = {"resume", "epochs", "patience", "data_dir", "download", "device", "items",
                        "threads", "log_interval", "progress", "eval_train", "eval_batch_size",
                        "results_dir", "test_curve", "eval_every"}


def check(cfg):
    """Values that would fail later, refused before anything runs."""
    positive = ("n_tastes", "epochs", "eval_batch_size", "eval_every", "log_interval", "lr",
                "implicit_temperature", "mixture_temperature")
    for key in positive:
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    if cfg["dim"] < 0 or (cfg["dim"] == 0 and cfg["task"] != "ranking"):
        raise ConfigError(f"--dim must be positive (0, from the data, serves the ranking task), got {cfg['dim']}")
    for key in ("patience", "threads", "init_std", "batch_size", "implicit_weight", "implicit_negatives", "lr_steps") \
            + tuple(f"prior_{name}" for name in PRIOR_TERMS + ("user_pairs",)):
        if cfg[key] < 0:
            raise ConfigError(f"--{key} must not be negative, got {cfg[key]}")
    if not 0 <= cfg["implicit_share"] <= 1:
        raise ConfigError(f"--implicit_share is a share of the epochs, from 0 to 1, got {cfg['implicit_share']}")
    if not 0 <= cfg["lr_decay"] <= 1:
        raise ConfigError(f"--lr_decay is a share of the run, from 0 to 1, got {cfg['lr_decay']}")
    if not 0 <= cfg["test_fraction"] < 1 or not 0 <= cfg["val_fraction"] < 1:
        raise ConfigError("--test_fraction and --val_fraction must lie in [0, 1) (0: no test set, or no "
                          "validation: a fit on all the data, docs/running.md)")
    for key, valid in (("task", ("rating", "ranking")), ("loss", LOSSES), ("prior_per", PRIOR_PER),
                       ("mixed_precision", MIXED_PRECISION)):
        if cfg[key] not in valid:
            raise ConfigError(f"--{key}={cfg[key]} is not one of {', '.join(valid)}")
    if cfg["mixed_precision"] == "bfloat16" and (cfg["task"], cfg["loss"]) != ("ranking", "softmax"):
        raise ConfigError("--mixed_precision=bfloat16 serves the ranking task's softmax loss (matrix "
                          "products of every user with every item); the rating task and the sampled "
                          "losses run through the fused node, in float32: use --mixed_precision=off")
    if cfg["top_k"] < 1 or cfg["n_negatives"] < 1 or cfg["ranking_core"] < 1:
        raise ConfigError("--top_k, --n_negatives and --ranking_core must be positive")
    if cfg["softmax_items"] < 0:
        raise ConfigError(f"--softmax_items={cfg['softmax_items']} must be 0 (the rule) or a number of items")
    if cfg["task"] == "ranking" and cfg["test_fraction"] + cfg["val_fraction"] >= 1:
        raise ConfigError("--test_fraction and --val_fraction leave nothing to train on")
    loader.formats.parse_weights(cfg["event_weights"], cfg["weight_column"])  # its form, before anything is read
    if cfg["split"] not in loader.SPLITS:
        raise ConfigError(f"--split={cfg['split']} is not one of {', '.join(loader.SPLITS)}")
    for key, limit in (("seed", 2 ** 64), ("split_seed", 2 ** 32)):  # torch's and numpy's generators
        if not 0 <= cfg[key] < limit:
            raise ConfigError(f"--{key} must lie between 0 and 2**{limit.bit_length() - 1} - 1, got {cfg[key]}")
    if cfg["device"] != "auto":
        check_device(cfg["device"])


def report_error(error):
    """The one line that says what went wrong. Under torchrun every process reads the same
    command line and data and meets the same bad input, and torchrun ends the others as soon as
    one exits: the first to exit must say it, and only one should. So the other ranks give rank 0
    BAD_INPUT_GRACE seconds to say it and exit (which ends them silently), and say it themselves
    only after that, so that it is never lost. Any other error (a full disk, a loss that turned
    NaN on one process's share) may be that process's own and is said at once where it happens."""
    same_everywhere = isinstance(error, (ConfigError, loader.DataError))
    if same_everywhere and int(os.environ.get("RANK", "0")) != 0:
        time.sleep(BAD_INPUT_GRACE)
    print(f"error: {error}", file=sys.stderr)


BAD_INPUT_GRACE = 20  # seconds: rank 0 meets the same bad input within them, even on a busy machine


def run_released(parallel, training, cfg):
    """Run train.py's training(local_rank, cfg) and release everything it built before Parallel's
    exit destroys the process group; returns the expected error (bad input, divergence, Ctrl-C) or None.

    The engines, their handlers and the DistributedDataParallel model form reference cycles
    that outlive training(), and an error's traceback holds its frames. Left to the collector
    at interpreter exit, they drop the last references to gloo's process group and to tensors
    its worker threads hold while Python finalizes; a worker that then needs the GIL is killed
    and the rank aborts ("terminate called without an active exception", exit code -6).
    Dropping the traceback and collecting here ends them while everything is still alive."""
    try:
        parallel.run(training, cfg)
        return None
    except (ConfigError, loader.DataError, TrainingError, KeyboardInterrupt, OSError) as error:
        # OSError: a full disk or a folder gone read-only while writing checkpoints or results
        # (checkpoints are written to a temporary file and renamed: the previous one stays).
        error.__traceback__ = error.__context__ = error.__cause__ = None
        return error
    finally:
        if idist.get_world_size() > 1:  # one process holds no process group: nothing to end
            gc.collect()


def pick_device(name):
    """The run's device (runs.check_device has checked that this machine has it)."""
    if name == "auto" or (name == "cuda" and idist.get_world_size() > 1):
        return idist.device()  # cuda:<local rank> when CUDA is there, else cpu
    return torch.device(name)


def check_device(name):
    """A device this machine has: the type torch knows and reports available (cuda, mps, xpu,
    ...), and for an indexed one (cuda:1) an index it has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device={name} is not a device: use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        raise ConfigError(f"--device={name} is not a device to train on: use auto, cpu, cuda or cuda:<index>")
    if not backend.is_available():
        raise ConfigError(f"--device={name}: {device.type.upper()} is not available on this machine")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device={name}: this machine has {count} {device.type} device(s), "
                          f"numbered from 0")


def resolve_config(argv, defaults, ranking_defaults, file_defaults=None):
    """train.py's settings: its defaults (ranking_defaults over them for --task=ranking, then
    file_defaults for a dataset given by path), or a resumed run's saved config, then the
    command line; checked."""
    overrides = parse_overrides(argv, defaults)
    cfg = dict(defaults)
    if overrides.get("resume"):
        run_dir = Path(overrides["resume"])
        cfg.update(saved_config(run_dir, defaults))
        fixed = sorted(k for k, v in overrides.items()
                       if k not in CHANGEABLE_ON_RESUME and v != cfg[k])
        if fixed:
            raise ConfigError(f"--resume={run_dir}: {', '.join(fixed)} cannot change when resuming "
                              "(the checkpoint fixes them); start a new run instead")
        cfg["run_name"], cfg["runs_dir"] = split_run_path(run_dir, cfg["run_name"])
    else:
        if overrides.get("task", cfg["task"]) == "ranking":
            cfg.update(ranking_defaults)
        if not loader.is_movielens(overrides.get("dataset", cfg["dataset"])):
            cfg.update(file_defaults or {})
    cfg.update(overrides)
    check(cfg)
    return cfg


class HelpRequested(Exception):
    """-h or --help on the command line: the caller prints its help."""


def key_value_args(argv, defaults):
    """The command line as ["--key=value", ...]: --key=value as it is, --key value joined, a bare
    --flag of a boolean knob as --flag=true; -h or --help raise HelpRequested."""
    joined, args = [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            raise HelpRequested
        if arg.startswith("--") and "=" not in arg and arg[2:] in defaults:
            if args and not args[0].startswith("--"):
                arg = f"{arg}={args.pop(0)}"
            elif isinstance(defaults[arg[2:]], bool):
                arg = f"{arg}=true"
            else:
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE or {arg} VALUE")
        joined.append(arg)
    return joined


def parse_overrides(argv, defaults):
    """--key=value (or --key value) pairs -> {key: value}, typed like the default; an unknown key
    is an error that names the closest known ones."""
    import difflib
    overrides = {}
    for arg in key_value_args(argv, defaults):
        if not arg.startswith("--"):
            raise ConfigError(f"arguments are --key=value or --key value, got {arg!r} (--help lists the keys)")
        key, text = arg[2:].split("=", 1) if "=" in arg else (arg[2:], None)
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "--help lists them all"
            raise ConfigError(f"unknown hyperparameter {key!r}: {hint}")
        overrides[key] = _typed(key, text, defaults[key])
    return overrides


KNOB = re.compile(r"^(\w+) = .*?\s+# (.*)$")


def help_text(script, usage, defaults, *variants):
    """train.py --help: the usage lines of its docstring, then every knob of the block at the top
    of script (between its two "# ---" rulers) with its default and its comment, grouped as
    there; variants: (label, {key: value}) defaults that differ, shown beside (ranking, files)."""
    lines = [line.rstrip() for line in Path(script).read_text().splitlines()]
    rulers = [k for k, line in enumerate(lines) if line.startswith("# ---")]
    examples = [line for line in usage.splitlines() if line.startswith("    ")]
    out = ["usage:", *examples, "", "Every knob is --key=value or --key value (booleans: true/false/1/0); a "
           "resumed run keeps its saved ones.", ""]
    previous, knobs = None, {}
    for line in lines[rulers[0] + 1:rulers[1]]:
        knob = KNOB.match(line)
        if knob and knob.group(1) in defaults:  # not a module constant of the block (tune.py's ranges)
            previous = knob.group(1)
            knobs[previous] = knob.group(2)
            out.append(previous)                         # its line, written below
        elif line.lstrip().startswith("# ") and line.startswith(" ") and previous in knobs:
            knobs[previous] += " " + line.strip()[2:]    # a knob's comment, continued
        elif line.startswith("# "):
            if previous != "title":                      # a group's first line names it
                out += ["", line[2:].split(": ")[0]]
            previous = "title"
    for k, key in enumerate(out):
        if key in knobs:
            beside = "".join(f"  [{label}: {changed[key]}]" for label, changed in variants
                             if key in changed and changed[key] != defaults[key])
            out[k] = f"  --{key}={defaults[key]}".ljust(30) + f" {knobs[key]}{beside}"
    return "\n".join(out) + "\n"


def _typed(key, text, default):
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} takes true or false (or 1 or 0), got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(default, float) and text.strip().lower() in ("inf", "-inf", "+inf"):
        value = float(text)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        kind = {"int": "a whole number", "float": "a number"}.get(type(default).__name__, type(default).__name__)
        raise ConfigError(f"--{key} takes {kind}, got {text!r}")
    return value


def saved_config(run_dir, defaults):
    """The settings a run folder was started with (its config.json), for --resume."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file() and Path(run_dir).is_dir() and not last_checkpoints(run_dir):
        raise ConfigError(f"--resume={run_dir}: that run was stopped before its settings were saved, and "
                          "nothing of it can be resumed: run its command again (it may keep its --run_name)")
    if not saved.is_file():
        raise ConfigError(f"--resume={run_dir}: no run there ({saved} is missing)")
    try:
        return {k: v for k, v in json.loads(saved.read_text()).items() if k in defaults}
    except (ValueError, AttributeError):
        raise ConfigError(f"--resume={run_dir}: {saved} is not a valid config file") from None


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
    name = f"{loader.dataset_label(cfg['dataset'])}-K{cfg['n_tastes']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return idist.broadcast(name, src=0) if idist.get_world_size() > 1 else name


class History:
    """Per-epoch metrics and accumulated wall time, saved with the checkpoints so that a resumed
    run writes one complete metrics.csv."""

    def __init__(self):
        self.rows, self.wall_seconds = [], 0.0

    def state_dict(self):
        return {"rows": self.rows, "wall_seconds": self.wall_seconds}

    def load_state_dict(self, state):
        self.rows, self.wall_seconds = list(state["rows"]), float(state["wall_seconds"])


def epoch_line(rows, task, max_epochs):
    """The console's line for the history's last epoch: its training loss, and when evaluated its
    validation figure beside the best so far; the seconds of its training steps."""
    row, key = rows[-1], f"val_{task.choose_by}"
    line = f"epoch {row['epoch']}/{max_epochs}  loss {row['train_loss']:.4f}"
    if key in row:
        best = max((r for r in rows if key in r), key=lambda r: task.sign * r[key])
        line += f"  val {task.choose_label} {row[key]:.4f} (best {best[key]:.4f} at epoch {best['epoch']})"
    elif f"train_{task.choose_by}" in row and "val" not in task.eval_batches:
        line += f"  train {task.choose_label} {row[f'train_{task.choose_by}']:.4f}"
    return line + f"  {row['epoch_seconds']:.1f} s"


def chosen_row(rows, task):
    """The history's row of the model a run keeps: the best by validation, or without a
    validation set (val_fraction=0) the last epoch."""
    key = f"val_{task.choose_by}"
    measured = [r for r in rows if key in r]
    return max(measured, key=lambda r: task.sign * r[key]) if measured else rows[-1]


def final_line(task, final, best, epochs_run):
    """The run's last line: its test figures (or that it has none: test_fraction=0), and which
    epoch is the model."""
    head = task.headline(final) if f"test_{task.choose_by}" in final else \
        "no test set (test_fraction=0: a fit on all the data, no test figures)"
    chosen = (f"best epoch {best['epoch']} of {epochs_run}, val {task.choose_by} {final[f'val_{task.choose_by}']:.4f}"
              if f"val_{task.choose_by}" in final else f"no validation: the last epoch, {epochs_run}, is the model")
    return f"{head} ({chosen})"


def say(line):
    """Print a line above any progress bar (tqdm's write), flushed: a log shows it at once."""
    from tqdm.auto import tqdm
    tqdm.write(line)
    sys.stdout.flush()


def unstarted_run_files(run_dir):
    """What a run that never finished an epoch (Ctrl-C, or NaN in epoch 1) left in its folder:
    its config and first events. A new run, or a resume, clears them and starts in that folder."""
    if not run_dir.is_dir() or last_checkpoints(run_dir):
        return []
    return [path for path in run_dir.iterdir()
            if path.name in ("config.json", "hparams") or path.name.startswith(("events.out.tfevents.", "best_"))
            or (path.name.startswith(".") and path.name.endswith(TEMPORARY))]


def check_new_run_folder(run_dir, results):
    """A new run may use an absent or empty folder, or one that an unstarted run left; never one
    that holds a run (it would be overwritten) or files that are not a run's, and never a results
    folder that holds files (another run's figures, from another --runs_dir)."""
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
    if results.is_dir() and any(results.iterdir()):
        raise ConfigError(f"{results} already holds the results of a run: pick another --run_name "
                          "or --results_dir")


def make_run_folders(run_dir, results):
    """Clear what an unstarted run left in run_dir, then make both folders, found unwritable now
    rather than after the training."""
    if not last_checkpoints(run_dir):
        for path in unstarted_run_files(run_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for folder in (run_dir, results):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create {folder}: {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{folder} is not writable")


class RunFolderSaver(DiskSaver):
    """Ignite's DiskSaver for a run folder, with two changes that make a run resumable after a
    kill at any moment. Ignite's Checkpoint removes the superseded file before it writes the new
    one: killed in between, a run had no last checkpoint at all (and started again from epoch 1),
    or a last checkpoint whose list of best models named a deleted file (and never resumed). Here
    remove() does nothing, and prune_superseded() deletes those files once the last checkpoint
    that no longer names them is written. Each file is written to a temporary name beside it and
    renamed over it, so a file is either whole or absent; a temporary left by a kill is pruned."""

    def __init__(self, run_dir):
        super().__init__(run_dir, create_dir=False, require_empty=False)  # the run makes its folder

    def __call__(self, checkpoint, filename, metadata=None):
        if idist.get_rank() == self.save_on_rank:
            path = self.dirname / filename
            temporary = path.with_name(f".{filename}{TEMPORARY}")
            try:
                torch.save(checkpoint, temporary)
                os.replace(temporary, path)
            except RuntimeError as error:
                # torch.save says a failed write (a full disk) as its zip writer's RuntimeError
                # ("iostream error", "unexpected pos"): said as the OSError it is, in one line.
                raise cannot_write(path, str(error).splitlines()[0], self.dirname, self.dirname) from None
            finally:
                temporary.unlink(missing_ok=True)

    def remove(self, filename):
        """Put off: see prune_superseded."""


class WriteError(OSError):
    """cannot_write's error: said as it is, whoever catches it on its way out."""


def cannot_write(what, reason, run_dir, folder):
    """The one line for a write into folder that failed (a full disk) while a run was saving
    what it had done: what, why, the room left there, and how to go on."""
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:,.0f} MiB free on its disk"
    except OSError:  # a folder gone with its disk
        free = ""
    return WriteError(f"cannot write {what} ({reason}{free}): the run's earlier checkpoints are kept, "
                      f"resume it with --resume={run_dir} once there is room")


def prune_superseded(run_dir, best_model):
    """Delete what the newest last checkpoint no longer needs: older last checkpoints, best
    models other than best_model (the path its best-model list names; None before the first
    evaluation), and temporaries of writes a kill cut short."""
    for path in last_checkpoints(run_dir)[:-1]:
        path.unlink(missing_ok=True)
    for path in Path(run_dir).glob("best_*.pt"):
        if best_model is None or path.name != Path(best_model).name:
            path.unlink(missing_ok=True)
    for path in Path(run_dir).glob(f".*{TEMPORARY}"):
        path.unlink(missing_ok=True)


def last_checkpoints(run_dir):
    """The run's last_checkpoint_<epoch>.pt files, oldest epoch first."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("last_checkpoint_*.pt")
             if (m := re.fullmatch(r"last_checkpoint_(\d+)\.pt", path.name))]
    return [path for _, path in sorted(found)]


def read_checkpoint(path):
    """A checkpoint's objects, on the CPU: Checkpoint.load_objects then copies each into its
    place on the device (model parameters and optimiser state), while the shuffling generator's
    state must stay a CPU tensor. A run folder may come from someone else, so only tensors and
    plain types are read (weights_only): a file that carries any other object is refused before
    anything of it runs. A damaged file is named in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only met an object that is not data
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ConfigError(f"{path} holds an object a checkpoint of this project never holds"
                          + (f" ({found.group(1)})" if found else "")
                          + ": it was not loaded and nothing in it ran; resume only run folders you trust") from None
    except Exception as error:  # truncated zip, bad pickle, wrong file: torch raises many kinds
        raise ConfigError(f"{path} is damaged or not a checkpoint ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'}); "
                          "restore it from a copy, or delete the run folder and start again") from None


def diverged(trainer):
    """Whether the last training step's loss is NaN or infinite (TerminateOnNan then stopped)."""
    output = trainer.state.output
    return output is not None and not math.isfinite(float(output["loss"]))


def divergence(state, run_dir):
    """The TrainingError of a run whose loss became NaN or infinite (Ignite's engine state)."""
    kept = (f"the checkpoint of epoch {state.epoch - 1} is kept in {run_dir}"
            if last_checkpoints(run_dir) else f"no epoch finished, {run_dir} holds no checkpoint")
    return TrainingError(f"training diverged: the loss became {float(state.output['loss'])} in epoch "
                         f"{state.epoch} (iteration {state.iteration}); nothing of that epoch was saved "
                         f"and {kept}. Lower --lr or raise the prior weights, and start a new run.")


def epochs_left(trainer, stopper, cfg, metric_label):
    """None when a (resumed) trainer has epochs to run, else why it has none, in words."""
    done = trainer.state.epoch
    if done >= cfg["epochs"]:
        return (f"has trained {done} epochs and --epochs={cfg['epochs']} (a larger --epochs continues it "
                "where its schedule allows: docs/running.md)")
    if stopper and done and stopper.counter >= stopper.patience:
        return (f"stopped early after epoch {done} (no better validation {metric_label} in "
                f"{stopper.patience} evaluations): pass a larger --patience to train further")
    return None


def warm_down(step, total_steps, decay):
    """train.py's learning-rate factor at a step: 1, then falling linearly to 0 over the last
    `decay` share of the run's total_steps (lr_decay)."""
    return np.clip((total_steps - step) / max(decay * total_steps, 1), 0.0, 1.0)  # step: an int or an array


def check_new_length(cfg, done, planned, steps_per_epoch, decay, implicit_epochs, run_dir):
    """A run planned for `planned` epochs and resumed after `done` with --epochs=cfg["epochs"]:
    allowed where what it has run so far is what a run of the new length would have run, so
    that the resumed run is that run exactly. Two things follow the run's length from its start:
    the learning rate's warm-down (over the share `decay` of the run: lr_decay, or
    tasks.warm_down_share's) and, in the rating task, the epochs that carry the implicit term
    (implicit_epochs(epochs), None without one). Once either has followed the
    old plan where the new one differs, going on would splice two schedules: refused, with what
    to run instead. Fewer epochs than done is no new plan: the run ends where it is."""
    epochs = cfg["epochs"]
    if epochs == planned or epochs <= done:
        return
    differs = []
    if decay:
        steps = np.arange(done * steps_per_epoch)
        old, new = (warm_down(steps, total * steps_per_epoch, decay) for total in (planned, epochs))
        if not np.array_equal(old, new):
            differs.append(f"its learning rate has begun the warm-down of a {planned}-epoch run "
                           f"(over the last {decay:.1%} of it: lr_decay={cfg['lr_decay']:g})")
    carried = implicit_epochs(planned), implicit_epochs(epochs)
    if carried[0] is not None and any((e <= carried[0]) != (e <= carried[1]) for e in range(1, done + 1)):
        differs.append(f"its implicit term stopped after epoch {carried[0]} (implicit_share="
                       f"{cfg['implicit_share']:g})")
    if done == planned and done % cfg["eval_every"]:
        # The last epoch is evaluated whatever eval_every says: that evaluation may have chosen
        # the model and counted for patience, where the longer run would not have made it.
        differs.append(f"its epoch {done} was evaluated because it was the last, which a longer run does "
                       f"not do (eval_every={cfg['eval_every']})")
    if differs:
        raise ConfigError(f"--epochs={epochs}: {run_dir} was planned for {planned} epochs and has run {done}; "
                          f"{' and '.join(differs)}, so going on would not be a {epochs}-epoch run. "
                          f"Resume with --epochs={planned}, or start a new run with --epochs={epochs} "
                          f"(its other settings are in {run_dir}/config.json)")


def check_model_fits(cfg, n_users, n_items, device):
    """Refuse, before allocating, a model whose training state cannot fit the device: its
    weights, their gradients and Adam's two moments, four float32 copies of every number."""
    numbers = n_users * (2 * cfg["n_tastes"] * cfg["dim"] + 1) + n_items * (cfg["dim"] + 1) + 1
    needed = 4 * 4 * numbers
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[1]
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ConfigError(f"--dim={cfg['dim']} and --n_tastes={cfg['n_tastes']} make a model of {numbers:,} "
                          f"numbers ({n_users:,} users x 2K x d, {n_items:,} items x d): training it needs "
                          f"{needed / 2 ** 30:,.1f} GiB (weights, gradients, Adam's state), more than the "
                          f"{available / 2 ** 30:,.1f} GiB of {device}: lower --dim or --n_tastes")


def write_split(run_dir, task):
    """split.parquet: every row the run split, user_id, item_id (raw ids), timestamp (where the
    data has times) and part (train, valid or test), so that another tool or paper can reuse the
    split exactly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    users, items, times, part = task.split
    columns = {"user_id": task.user_ids[users], "item_id": task.item_ids[items]}
    if times is not None:
        columns["timestamp"] = times
    columns["part"] = pa.DictionaryArray.from_arrays(pa.array(part.astype(np.int8)), ["train", "valid", "test"])
    table = pa.table(columns)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_atomically(run_dir / "split.parquet", buffer.getvalue().to_pybytes())


def save_run_data(run_dir, task, cfg):
    """What inference needs beside the model and config.json, so that a finished run folder
    answers on its own (recommend.py): the raw user and item ids of the model's rows, each
    user's rated (or, for ranking, interacted) items, and the items' titles and genres when the
    dataset has a movie file or an --items file. Kept in runs/ only: MovieLens may not be
    redistributed. Returns the items as items.json lists them (named by id when there are no
    names)."""
    users, items = task.seen
    order = np.argsort(users.astype(np.int64) * task.n_items + items)  # by user, then item (lexsort's order, 2x faster)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=task.n_users))])
    arrays = io.BytesIO()
    # prior_weights: the L2 prior's weights the run trained with (PRIOR_TERMS' order, after
    # tasks.prior_weights' rule), which recommend.py's fold-in of new users keeps.
    np.savez(arrays, user_ids=task.user_ids, item_ids=task.item_ids, seen_indptr=indptr,
             seen_items=items[order], rating_range=np.array(task.rating_range or (), dtype=np.float64),
             trained_items=task.trained_items,
             prior_weights=np.array([task.prior_weights[name] for name in PRIOR_TERMS], dtype=np.float64))
    write_atomically(run_dir / "dataset.npz", arrays.getvalue())
    write_split(run_dir, task)
    try:
        names = loader.read_items(cfg["dataset"], cfg["data_dir"], cfg["items"])
    except loader.DataError as error:  # a bad items file, or the data folder moved: ids stand for titles
        print(f"note: items are named by id ({error})", file=sys.stderr)
        names = None
    unnamed = [{"item_id": i.item(), "title": str(i), "year": None, "genres": []} for i in task.item_ids]
    if names is None:
        return unnamed
    by_id = {str(m["item_id"]): m for m in names}  # ids compared as text: 7 in one file is "7" in another
    # Each named item keeps the run's own id (198, not the items file's "198" where one of its ids
    # is no integer): recommend.py answers with the ids dataset.npz and recommend_all use.
    items = [{**by_id[str(i)], "item_id": plain["item_id"]} if str(i) in by_id else plain
             for i, plain in zip(task.item_ids, unnamed)]
    missing = sum(item is plain for item, plain in zip(items, unnamed))
    if missing:
        print(f"note: {missing:,} of the {len(items):,} items have no name in the items file: shown by id",
              file=sys.stderr)
    write_atomically(run_dir / "items.json", json.dumps(items))
    return items


def write_results(folder, summary, rows, plots):
    """metrics.csv (one row per epoch), the task's SVG plots, and summary.json last: its presence
    says the run is finished."""
    folder.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(folder / "metrics.csv", table.getvalue())
    pictures.metric_curves(folder, rows, plots, summary["best_epoch"],
                           f"{summary['dataset']}, K={summary['hyperparameters']['n_tastes']}")
    write_atomically(folder / "summary.json", json.dumps(summary, indent=2) + "\n")


def attach_tensorboard(run_dir, trainer, evaluators, optimizer, task, cfg):
    """tensorboardX through Ignite's TensorboardLogger: loss, data term and each prior term every
    log_interval iterations, the metrics of every split each epoch, the hyperparameters."""
    # A resumed run hides what an interrupted invocation logged past its last checkpoint.
    tb_logger = TensorboardLogger(log_dir=str(run_dir), purge_step=trainer.state.iteration or None,
                                  max_queue=EVENT_QUEUE)
    quiet_event_writers()
    events_failed.clear()
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=cfg["log_interval"]) | Events.EPOCH_COMPLETED,
                              lambda _: check_events_written(tb_logger, run_dir))

    def scalars(out):
        values = {"loss": float(out["loss"]), **{name: float(v) for name, v in out["terms"].items()}}
        values.update({f"prior_{n}": float(v) for n, v in zip(PRIOR_TERMS, out["prior"])})
        return values

    tb_logger.attach_output_handler(trainer, Events.ITERATION_COMPLETED(every=cfg["log_interval"]),
                                    tag="train_step", output_transform=scalars)
    tb_logger.attach_opt_params_handler(trainer, Events.EPOCH_STARTED, optimizer)

    def metrics_of(engine, split):  # tagged "<split>/mse": the engines name them "<split>_mse"
        return lambda _: {m: engine.state.metrics[f"{split}_{m}"] for m in task.metric_names}

    engines = [(Events.EPOCH_COMPLETED, ("train",), trainer)] if task.free_train_metrics else []
    for event, splits, engine in engines + [(Events.COMPLETED, splits, e) for splits, e in evaluators]:
        for split in splits:
            tb_logger.attach_output_handler(engine, event, tag=split, output_transform=metrics_of(engine, split),
                                            global_step_transform=global_step_from_engine(trainer))
    tb_logger.writer.add_text("config", "    " + json.dumps(cfg, indent=2).replace("\n", "\n    "))
    return tb_logger


# tensorboardX writes TensorBoard's events from a thread of its own. A write that fails there (a
# full disk) ended that thread with a traceback, and once its queue held max_queue events (10 by
# default) every later add_scalar waited forever: the run hung. The queue here holds far more
# events than a run adds between two checks, and quiet_event_writers keeps the thread's error
# (events_failed) for check_events_written to say in one line.
EVENT_QUEUE = 100_000
events_failed = []  # the errors that ended tensorboardX's writer threads in this process
_print_thread_error, _print_unraisable = threading.excepthook, sys.unraisablehook  # Python's, until replaced


def quiet_event_writers():
    """Route tensorboardX's failures to the run's own error line instead of tracebacks: its
    writer thread's error is kept in events_failed, and the OSError of its close at exit (a
    writer whose flush met the full disk stays open, and tensorboardX closes it again at exit) is
    dropped: the run has said it. Other threads' errors and unraisable errors print as before."""
    if threading.excepthook is not _keep_event_writer_errors:
        global _print_thread_error, _print_unraisable
        _print_thread_error, threading.excepthook = threading.excepthook, _keep_event_writer_errors
        _print_unraisable, sys.unraisablehook = sys.unraisablehook, _drop_event_writer_exit_errors


def _keep_event_writer_errors(args):
    if type(args.thread).__name__ == "_EventLoggerThread":  # tensorboardX's writer thread
        events_failed.append(args.exc_value)
    else:
        _print_thread_error(args)


def _drop_event_writer_exit_errors(unraisable):
    if not (getattr(unraisable.object, "__module__", None) == "tensorboardX.writer"
            and isinstance(unraisable.exc_value, (OSError, ValueError))):
        _print_unraisable(unraisable)


def check_events_written(tb_logger, run_dir):
    """cannot_write's error if tensorboardX's writer thread has failed (the writer closed
    first, its own errors dropped)."""
    if events_failed:
        close_quietly(tb_logger)
        reason = events_failed[0]
        raise cannot_write(f"TensorBoard's events in {run_dir}", getattr(reason, "strerror", None) or reason,
                           run_dir, run_dir)


def close_quietly(tb_logger):
    try:
        tb_logger.close()
    except (OSError, ValueError):  # the full disk again: the caller says the first error
        pass


@contextlib.contextmanager
def saving_into(folder, run_dir, tb_logger):
    """The end of a run writing into folder: an OSError (a full disk) becomes cannot_write's one
    line, naming the file where the error names one, else folder; the TensorBoard writer is
    closed quietly first."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        close_quietly(tb_logger)
        where = Path(error.filename) if error.filename else Path(folder)
        raise cannot_write(where, error.strerror or error, run_dir, folder) from None


def describe(cfg, task, model):
    """What summary.json records of a run beside its figures: task, data, sizes, processes,
    versions, every hyperparameter and the prior weights trained with."""
    import ignite
    return {"task": cfg["task"], "dataset": cfg["dataset"], "n_users": task.n_users,
            "n_items": task.n_items, **task.counts, "batch_size_used": task.batch_size,
            **({} if "test" in task.eval_batches else {"test_set": "none: test_fraction=0, a fit on all the data, "
                                                                    "so there are no test figures"}),
            "prior_weights_used": task.prior_weights,  # the knobs' weights after tasks.prior_weights' rule
            "lr_used": cfg["lr"] * task.lr_scale,  # the peak lr after tasks.lr_scale's rule
            "lr_decay_used": task.lr_decay,  # its warm-down's share after tasks.warm_down_share's
            "world_size": idist.get_world_size(), "backend": idist.backend() or "none",
            "device": str(next(model.parameters()).device),
            "training_products": "bfloat16" if task.bfloat16 else "float32", "torch": torch.__version__,
            "ignite": ignite.__version__, "hyperparameters": cfg}


PROJECTOR_ITEMS = 10_000  # the items TensorBoard's projector shows at most (write_projector)


def write_projector(writer, run_dir, item_vectors, movies, seen_items):
    """The item embeddings (n_items, d) with titles and genres in TensorBoard's projector. One
    entry per run: a run finished again (resumed for more epochs, or after an interrupted end)
    replaces its entry instead of adding a second one beside it. Above PROJECTOR_ITEMS items,
    the PROJECTOR_ITEMS with the most interactions (seen_items: the item of each), in item order: the
    projector's file is text (ML-25M's 59,047 x 160 took 14 s to write, 100 MB for a browser
    to load). item_vectors as a numpy array: tensorboardX writes them one number at a time, and
    a numpy row's numbers come out in half the time of a tensor's (ML-1M: 0.49 s against 0.88 s),
    the same text."""
    shutil.rmtree(run_dir / "00000" / "item_embeddings", ignore_errors=True)
    (run_dir / "projector_config.pbtxt").unlink(missing_ok=True)
    shown = np.arange(len(item_vectors))
    if len(shown) > PROJECTOR_ITEMS:
        interactions = np.bincount(seen_items, minlength=len(item_vectors))         # (n_items,)
        shown = np.sort(np.argsort(-interactions, kind="stable")[:PROJECTOR_ITEMS])
    writer.add_embedding(item_vectors[shown], tag="item_embeddings", metadata_header=["title", "genres"],
                         metadata=[[movies[i]["title"], "|".join(movies[i]["genres"]) or "-"] for i in shown])

"""Train a mixture-of-tastes model on MovieLens: rating prediction or top-N ranking.

    python train.py                                     # rating: defaults below
    python train.py --task=ranking                      # ranking: implicit feedback, NDCG@10
    python train.py --dataset=ml-100k --epochs=5 --run_name=try
    python train.py --resume=runs/try --epochs=10       # continue a run where it stopped
    torchrun --nproc_per_node=2 train.py                # several processes (see docs/)

Every hyperparameter is a constant just below; any of them can be overridden as --key=value.
This file holds the knobs and the wiring of one run; the two tasks (data, loss, metrics) are in
tasks.py, the run's folders, checkpoints and results in runs.py, its pictures in pictures.py.
TensorBoard curves and checkpoints go to runs/<run_name>/, the final figures to
results/<run_name>/ (summary.json, metrics.csv, SVG plots). Exit status: 0 done (or nothing
left to do), 1 training diverged, 2 bad input (one line says what and where), 130 interrupted.
"""

import gc

# The imports below build hundreds of thousands of objects (torch's, Ignite's) that live as long
# as the process. The collector walking them while they are built took 0.35 s of every run, and
# 0.7 s in the collection at exit: it is off while they are imported, then they are frozen out
# of its sight and it is switched back on.
gc.disable()

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import (
    Checkpoint,
    EarlyStopping,
    LRScheduler,
    ProgressBar,
    TerminateOnNan,
    global_step_from_engine,
)
from ignite.metrics import Average

import loader
import pictures
import runs
from MFMixTaste import PRIOR_TERMS, MFMixTaste
from runs import ConfigError, TrainingError
from tasks import SPLITS, TASKS, run_evaluators

gc.freeze()
gc.enable()

# -----------------------------------------------------------------------------
task = "rating"            # "rating": predict explicit ratings (MSE); "ranking": rank all items per user (implicit)
# data
dataset = "ml-1m"          # a MovieLens name (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m, ml-latest-small) or the path
                           # of an interactions file, or of a folder with one (or with train/valid/test files): docs/data.md
columns = ""               # a file's columns where their names are not recognised: USER,ITEM[,RATING[,TIMESTAMP]]
                           # (header names or 0-based positions; an empty entry skips one)
items = ""                 # a file naming the items (id, title[, genres]), shown by recommend.py and the pictures
skip_bad_lines = False     # drop (and count) lines that cannot be read, instead of stopping at the first
event_weights = ""         # COLUMN:VALUE=W,... weighs each row by its event (view=0.2,purchase=1); unlisted: dropped
weight_column = ""         # a numeric COLUMN (plays, quantities) weighing each row log(1 + x) (docs/data.md)
data_dir = "data"          # MovieLens names: folder holding <dataset>.zip or its extracted folder; downloads go here
download = True            # MovieLens names: download from GroupLens when no local copy is found
test_fraction = 0.25       # rows held out for test, drawn as the replaced script did (seed 42, in file order)
val_fraction = 0.05        # share of the training rows held out for early stopping and model choice
split_seed = 42            # seed of the train/test and train/val splits (42 = the replaced script's split)
split = "random"           # "random"; "time": the latest test_fraction by time are the test set; "last": each user's latest
# ranking (task="ranking"): RecBole's ml-1m protocol, each user's interactions split train/val/test
ranking_min_rating = 3.0   # a rating >= this is a positive interaction (the value is then dropped)
ranking_core = 10          # users and items with fewer positives are removed, repeatedly until none is
loss = "softmax"           # ranking loss: softmax (all items), sampled_softmax, bpr, adaptive_hinge (Kula's)
softmax_items = 0          # items in a step's softmax: 0 = all up to 8,192 items, else 4,096 drawn (docs/scale.md); N: N
n_negatives = 100          # uniform negatives per positive (sampled_softmax, bpr, adaptive_hinge takes the hardest)
top_k = 10                 # cut-off k of NDCG, Recall, MRR, Hit and Precision; validation NDCG@k picks the epoch
# model
dim = 32                   # latent dimension d of tastes, attention and item vectors (ranking's 0: from the data,
                           # 160 for users of prior_user_pairs interactions, up to 320 for sparser ones: tasks.dim_for)
n_tastes = 2               # tastes per user, K (1 = biased matrix factorisation)
mixture_temperature = 1.0  # tau of the mixture weights softmax_k(A_k.e / tau) (1 = Kula's; small: one taste per item)
init_std = 0.01            # std of the factors at start (see MFMixTaste.__init__)
# L2 prior: loss = MSE + (1/n_train) * sum over rows of weight * |row|^2 (prior_per="row"), a
# Gaussian prior on each user's and item's vectors. A row's prior does not grow with its ratings,
# so a weight counts like that many ratings: a user's bias with n ratings shrinks by n / (n +
# weight), a lot at 10 ratings, hardly at 1000, and sparse sets are held back where dense ones
# are not. One setting serves ML-1M and sets a tenth its size (results/benchmark.md, "Defaults
# across data sizes"); the per-rating weighting ("pair") needed a weight per dataset.
prior_per = "row"          # "row": each row counted once per epoch; "pair": once per rating that uses it (SGD-MF's weighting)
prior_tastes = 10.0        # on the users' taste vectors U (with t=0.02, lr 0.015; docs/research/rating-rounds.md, tastes round)
prior_attention = 0.5      # on the attention vectors A: they only pick among the tastes (at 5 they stayed at 0)
prior_items = 10.0         # on the item vectors e
prior_biases = 3.0         # on user and item biases
prior_user_pairs = 0       # prior_per="pair": tastes' and attention's weights are for users of this many interactions
                           # on average; sparser data scales them by it / its mean (0 = off; tasks.prior_weights)
share_taste_prior = False  # a pair's prior on the tastes shared among them by its mixture weights (a taste held by
                           # the pairs it serves), not counted for every taste (docs/research/tastes-rounds.md, 4th round)
# implicit feedback in the rating task: which movies a user chose to rate (MFMixTaste's docstring)
implicit_weight = 2.0      # weight of the BPR term on the attention vectors, beside the MSE (0 = off)
implicit_negatives = 3     # movies drawn uniformly per rating for that term
implicit_temperature = 0.02 # t of its claim t*logsumexp_k(A_k.e/t): small = the best taste claims the movie alone
implicit_share = 0.8       # share of the epochs, from the first, that carry the term; the last fit the MSE alone
                           # (5 epochs: the fifth is 40% faster, validation MSE +0.0003; docs/rating.md)
# optimisation
lr = 1.5e-2                # Adam learning rate (its peak, see lr_decay)
lr_decay = 0.4             # share of the run, at its end, over which lr falls linearly to 0 (0 = constant lr); where
                           # lr_steps scales lr, the peak is held the steps it is held on epochs of lr_steps steps
                           # and the warm-down takes the rest (Amazon Beauty: 0.92; tasks.warm_down_share)
lr_steps = 0               # ranking softmax: lr is for epochs of this many steps, longer ones scale it (tasks.lr_scale)
batch_size = 0             # per step (the global batch): ratings; for ranking, users (softmax) or interactions; 0 =
                           # n_train / 64 within 8192 and 256 steps an epoch (ML-1M: 8192, ML-25M: 68,206); ranking's
                           # softmax: 256 users (lr_steps=0 or past 256 steps an epoch: more, to keep 24 steps an epoch)
epochs = 5                 # epochs to run, the length of the lr schedule (early stopping may end it sooner)
patience = 2               # early stopping: evaluations without a better validation MSE (NDCG@k) before stopping
clip_predictions = True    # clamp evaluated predictions to the training set's rating range
eval_train = False         # training-set metrics from a full pass after each epoch (else, free, from the epoch's own batches)
test_curve = True          # also score the test set after every epoch, for its curve (False: only the chosen model, at the end)
eval_every = 1             # evaluate every this many epochs, and after the last; the model is chosen among those
mixed_precision = "auto"   # "bfloat16": the training forward under torch.autocast (matrix products in bf16, weights,
                           # optimiser and evaluation in fp32); "off"; "auto": bfloat16 for the full-softmax ranking
                           # loss where the device computes bf16 natively (CUDA; a CPU: if measured faster, or sampled)
eval_batch_size = 16384    # ratings per evaluation batch (temporaries under 32 MB, see keep_freed_memory); ranking: /16 users
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
progress = True            # show Ignite's progress bar (on a terminal; a log gets one line an epoch either way)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
# What --task=ranking changes in the defaults above (an explicit --key=value still wins): chosen
# on ML-1M's validation NDCG@10 (docs/ranking.md).
RANKING_DEFAULTS = dict(test_fraction=0.1, val_fraction=0.1, split_seed=2020, dim=0, n_tastes=2,
                        prior_per="pair", prior_user_pairs=100, prior_tastes=0.07, share_taste_prior=True,
                        prior_attention=0.05, prior_items=0.03, prior_biases=0.0, lr=0.03, lr_decay=0.7,
                        lr_steps=24, batch_size=0, epochs=15, patience=3, eval_every=8)
# What a dataset given by path changes (an explicit --key=value still wins): RecBole's ML-1M protocol
# is MovieLens's; a file is used as it is, every row an interaction (docs/data.md).
FILE_DEFAULTS = dict(ranking_min_rating=float("-inf"), ranking_core=1)


def resolve_config(argv):
    """Defaults, then the resumed run's saved config, then the command line, checked."""
    return runs.resolve_config(argv, DEFAULTS, RANKING_DEFAULTS, FILE_DEFAULTS)


# ----------------------------------------------------------------------------- the run

def training(local_rank, cfg, attach=None):
    """One process's run, in stages: folders and data, model and trainer, evaluation and model
    choice, checkpoints and resume, training, then the final figures of the best model. attach,
    if given, is called as attach(trainer, validation_evaluator, task) once both exist (tune.py
    hangs Optuna's pruning handler there)."""
    started = time.perf_counter()
    runs.keep_freed_memory()
    rank = idist.get_rank()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = runs.pick_device(cfg["device"])
    run_dir, results, task = open_run(cfg, device)
    if rank == 0 and attach is None:  # what was read and kept (tune.py's trials would repeat it)
        print("\n".join(task.described), flush=True)
    model, optimizer, trainer = build_trainer(cfg, task, device)
    idist.barrier()  # every rank has looked, and built its model, before rank 0 makes the folders
    if rank == 0:
        runs.make_run_folders(run_dir, results)
    evaluators, validation, history, best_checkpoint, stopper, evaluate = evaluate_each_epoch(
        cfg, task, model, trainer, run_dir)
    if attach:
        attach(trainer, validation, task)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "batches": task.batches,
               "history": history, "best_checkpoint": best_checkpoint}
    if stopper:
        to_save["early_stopping"] = stopper
    if task.lr_decay:
        to_save["lr_schedule"] = attach_lr_schedule(cfg, trainer, optimizer, len(task.batches), task.lr_decay)
    wall_before, save_last = save_and_resume(cfg, to_save, run_dir, started, task)  # seconds of earlier invocations

    left = runs.epochs_left(trainer, stopper, cfg, task.choose_label)
    # Rank 0 decides for all: only its disk surely holds the results folder.
    finished = idist.broadcast(int(left is not None and (results / "summary.json").is_file()), src=0)
    if finished:
        if rank == 0:
            print(f"nothing to do: {run_dir} {left}; its results are in {results}/")
        return
    if left is not None and "val" in task.eval_batches and f"val_{task.choose_by}" not in history.rows[-1]:
        # Resumed with no epoch left to train (--epochs cut to the epochs done) after an epoch
        # that was not evaluated (eval_every): that epoch is the last, and is evaluated now.
        evaluate(trainer, last=True)
        save_last(trainer)

    # --- training
    tb_logger = None
    if rank == 0:
        runs.write_atomically(run_dir / "config.json", json.dumps(cfg, indent=2) + "\n")
        tb_logger = runs.attach_tensorboard(run_dir, trainer, evaluators, optimizer, task, cfg)
        if cfg["progress"] and left is None and sys.stderr.isatty():  # a redirected log gets the epoch lines only
            ProgressBar(persist=False, desc="Epoch").attach(
                trainer, output_transform=lambda out: {"loss": out["loss"]})
    if left is None:
        trainer.run(task.batches, max_epochs=cfg["epochs"])
    if runs.diverged(trainer):
        if tb_logger:
            tb_logger.close()
        raise runs.divergence(trainer.state, run_dir)
    optimizer.state.clear()  # Adam's moments (twice the model) are in the last checkpoint: the end needs none
    finish(cfg, task, model, best_checkpoint.last_checkpoint, history, trainer.state.epoch,
           run_dir, results, tb_logger, wall_before + time.perf_counter() - started)
    # Let every rank leave together, before runs.run_released (main) releases the model and engines
    # and Parallel destroys the process group.
    idist.barrier()


def open_run(cfg, device):
    """The run's folders, looked at (training() makes them once the data, settings and model have
    passed their checks: bad input leaves nothing behind), and its task. Rank 0 downloads and
    parses the data (and fills the cache) while the others wait for it."""
    rank, world_size = idist.get_rank(), idist.get_world_size()
    cfg["run_name"] = runs.decide_run_name(cfg)
    run_dir = Path(cfg["runs_dir"]) / cfg["run_name"]
    results = Path(cfg["results_dir"]) / cfg["run_name"]
    if not cfg["resume"]:
        runs.check_new_run_folder(run_dir, results)
    with idist.one_rank_first():
        ratings = loader.load(cfg["dataset"], cfg["data_dir"], cfg["download"],
                              progress=cfg["progress"] and rank == 0 and sys.stderr.isatty(), columns=cfg["columns"],
                              skip_bad_lines=cfg["skip_bad_lines"],
                              weights=loader.formats.parse_weights(cfg["event_weights"], cfg["weight_column"]))
        if cfg["items"]:  # read now, so a bad file stops the run before it trains
            loader.read_items(cfg["dataset"], cfg["data_dir"], cfg["items"])
    task = TASKS[cfg["task"]](cfg, ratings, device, rank, world_size)
    # The d the task trains (the ranking task's dim=0: from the data) goes into the run's config,
    # which a resumed run and recommend.py then read; so does what mixed_precision="auto" chose
    # (on a CPU, measured: a resumed run trains in the precision it began in).
    cfg["dim"], cfg["mixed_precision"] = task.dim, "bfloat16" if task.bfloat16 else "off"
    return run_dir, results, task


def build_trainer(cfg, task, device):
    """The model, its optimiser, and the trainer engine whose step is the task's loss plus the
    L2 prior."""
    torch.manual_seed(cfg["seed"])  # same initial model on every rank
    runs.check_model_fits(cfg, task.n_users, task.n_items, device)
    model = MFMixTaste.from_config(cfg, task.n_users, task.n_items, global_mean=task.global_mean)
    model = idist.auto_model(model)  # moves to the device; DistributedDataParallel if world > 1
    # Adam for the whole model: the fused kernel updates the dense tables in one pass per step
    # (on CPU as on GPU); with batches of 8192 ratings, a dense update costs less than the
    # bookkeeping of sparse ones (SparseAdam measured 1.3x slower per epoch on ML-1M).
    optimizer = idist.auto_optim(torch.optim.Adam(model.parameters(), lr=cfg["lr"] * task.lr_scale, fused=True))
    prior_weights = torch.tensor([task.prior_weights[name] for name in PRIOR_TERMS], device=device)

    def train_step(engine, batch):
        model.train()
        with torch.autocast(device.type, torch.bfloat16, enabled=task.bfloat16):
            terms, squared_norms, share, extra = task.loss(model, batch)
        prior_by_term = squared_norms * prior_weights                   # (4,), as in PRIOR_TERMS
        loss = sum(task.term_weights[name] * value for name, value in terms.items()) + prior_by_term.sum()
        optimizer.zero_grad(set_to_none=True)
        # DistributedDataParallel averages gradients over ranks; weighting each rank's loss by
        # its share of the global batch makes the update that of the whole batch.
        (loss * share).backward()
        optimizer.step()
        return {"loss": loss.detach(), "terms": {name: value.detach() for name, value in terms.items()},
                "prior": prior_by_term.detach(), **extra}

    trainer = Engine(train_step)
    trainer.logger.addFilter(runs.QUIET_ENGINE_EXCEPTIONS)  # the evaluators share this logger
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(lambda out: out["loss"]))
    Average(output_transform=lambda out: out["loss"], device=device).attach(trainer, "loss")
    task.attach(trainer)  # the task's own handlers: its training metrics, its per-epoch settings
    return model, optimizer, trainer


def attach_lr_schedule(cfg, trainer, optimizer, steps_per_epoch, decay):
    """lr held at its peak, then falling linearly to 0 over the last `decay` share of the
    epochs' steps (a warm-down; lr_decay, or tasks.warm_down_share's where lr is scaled): on
    ML-1M the run then ends in 5 epochs where a constant lr needed 12 and early stopping, at
    the same validation MSE (docs/rating.md). Ignite's LRScheduler around torch's LambdaLR: its
    step count is checkpointed, its shape follows the current --epochs (a resume may change them
    only before the two shapes part: runs.check_new_length)."""
    total = cfg["epochs"] * steps_per_epoch
    schedule = LRScheduler(torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(runs.warm_down(step, total, decay))))
    trainer.add_event_handler(Events.ITERATION_STARTED, schedule)
    return schedule


# TerminateOnNan stops mid-epoch, but Ignite still fires EPOCH_COMPLETED: the handlers of that
# event skip a diverged epoch, so no NaN model is evaluated or saved.
EPOCH_COMPLETED = Events.EPOCH_COMPLETED(event_filter=lambda engine, _: not runs.diverged(engine))


def evaluate_each_epoch(cfg, task, model, trainer, run_dir):
    """The evaluators run after every eval_every-th epoch and the last into the history (each
    epoch has a row, with its training loss); the best model by the validation metric is kept
    (best_model_*.pt), and early stopping watches it, counting evaluations. The test set chooses
    nothing: it is only measured."""
    evaluated = [s for s in SPLITS if s in task.eval_batches and not (s == "train" and task.free_train_metrics)
                 and (s != "test" or cfg["test_curve"])]
    evaluators = task.evaluators(model, evaluated)  # [(splits, engine)]: ranking scores val and test at once
    # No validation set (val_fraction=0): no early stopping, and the last epoch is the model.
    validation = next((engine for splits, engine in evaluators if "val" in splits), None)
    history = runs.History()

    @trainer.on(EPOCH_COMPLETED)
    def evaluate(engine, last=False):
        """The epoch's row of the history, with the evaluations when due; last: the epoch just
        finished by an earlier invocation is the run's last, and its row gets them now."""
        if last:
            row = history.rows[-1]
        else:  # Ignite's own timing of the epoch's steps, read before the evaluation adds to it
            row = {"epoch": engine.state.epoch, "train_loss": engine.state.metrics["loss"],
                   "epoch_seconds": round(engine.state.times[Events.EPOCH_COMPLETED.name], 3)}
            if task.free_train_metrics:
                row.update({f"train_{m}": engine.state.metrics[f"train_{m}"] for m in task.metric_names})
        if last or engine.state.epoch % cfg["eval_every"] == 0 or engine.state.epoch == engine.state.max_epochs:
            # The last step's gradients (ML-25M's tables': 0.45 GB) freed for the evaluation to use.
            model.zero_grad(set_to_none=True)
            row.update(run_evaluators(task, evaluators))
        if not last:
            history.rows.append(row)
        if idist.get_rank() == 0:  # one line an epoch, whatever the progress bar does
            runs.say(runs.epoch_line(history.rows, task, engine.state.max_epochs))

    def validation_score(_):  # Ignite's handlers keep the highest score
        return task.sign * validation.state.metrics[f"val_{task.choose_by}"]

    score_name = ("" if task.higher_is_better else "neg_") + "val_" + task.choose_by.replace("@", "_at_")
    best_checkpoint = Checkpoint(
        {"model": model}, runs.RunFolderSaver(run_dir), filename_prefix="best", n_saved=1,
        **(dict(score_function=validation_score, score_name=score_name) if validation else {}),
        global_step_transform=global_step_from_engine(trainer))
    (validation or trainer).add_event_handler(Events.COMPLETED if validation else EPOCH_COMPLETED, best_checkpoint)
    stopper = EarlyStopping(cfg["patience"], validation_score, trainer) if cfg["patience"] and validation else None
    if stopper:
        validation.add_event_handler(Events.COMPLETED, stopper)
    return evaluators, validation, history, best_checkpoint, stopper, evaluate


def save_and_resume(cfg, to_save, run_dir, started, task):
    """Checkpoint every object of the run after each epoch (last_checkpoint_<epoch>.pt, named by
    epoch: resume takes the highest, whatever the files' times say), then delete what it
    supersedes (runs.RunFolderSaver says why only then); load the latest one when resuming.
    Returns the wall seconds of earlier invocations and the saving handler."""
    trainer, history = to_save["trainer"], to_save["history"]
    last_checkpoint = Checkpoint(to_save, runs.RunFolderSaver(run_dir), filename_prefix="last", n_saved=1,
                                 global_step_transform=global_step_from_engine(trainer))

    @trainer.on(EPOCH_COMPLETED)
    def save_last(engine):
        history.wall_seconds = wall_before + time.perf_counter() - started
        last_checkpoint(engine)
        if idist.get_rank() == 0:
            runs.prune_superseded(run_dir, to_save["best_checkpoint"].last_checkpoint)

    if cfg["resume"]:
        saved = runs.last_checkpoints(run_dir)
        if saved:
            state = runs.read_checkpoint(saved[-1])
            # A knob added on resume (patience 0 -> 2) has no saved state: it starts fresh.
            Checkpoint.load_objects({k: v for k, v in to_save.items() if k in state}, state)
            runs.check_new_length(cfg, trainer.state.epoch, trainer.state.max_epochs, len(task.batches),
                                  task.lr_decay, task.implicit_epochs, run_dir)
        elif idist.get_rank() == 0:
            print(f"{run_dir} has no checkpoint yet (it stopped in its first epoch): starting it "
                  "from epoch 1")
    wall_before = history.wall_seconds  # of earlier invocations, when resuming
    return wall_before, save_last


def finish(cfg, task, model, best_file, history, epochs_run, run_dir, results, tb_logger, wall_seconds):
    """The final figures: the best-by-validation model on every split its epoch did not evaluate.
    Rank 0 reads it and sends it to the others (every rank evaluates the same model without a
    shared disk), unless it is the last epoch's, in memory already; then rank 0 writes the run
    data, pictures and results, summary.json last (a run interrupted before it resumes at this
    stage; one that has it is finished)."""
    best = runs.chosen_row(history.rows, task)
    if best["epoch"] != epochs_run:  # else the model in memory is the chosen one: a second copy
        # of it read from disk (0.45 GB at ML-25M's shape) was the run's peak memory (issue 46)
        if idist.get_rank() == 0:
            Checkpoint.load_objects({"model": model}, runs.read_checkpoint(best_file))
        if idist.get_world_size() > 1:
            for tensor in model.state_dict().values():
                idist.broadcast(tensor, src=0)
    known = {f"{s}_{m}": best[f"{s}_{m}"] for s in ("test", "val") if f"{s}_{task.choose_by}" in best
             for m in task.metric_names}  # the chosen epoch's own figures: not evaluated again
    missing = [s for s in ("test", "val", "train") if f"{s}_{task.choose_by}" not in known and s in task.eval_batches]
    known.update(run_evaluators(task, task.evaluators(model, missing)))
    final = {f"{s}_{m}": known[f"{s}_{m}"] for s in ("test", "val", "train") if f"{s}_{task.choose_by}" in known
             for m in task.metric_names}  # test first: the figures summary.json leads with
    if idist.get_rank() != 0:
        return
    trained = getattr(model, "module", model)
    with runs.saving_into(run_dir, run_dir, tb_logger):
        movies = runs.save_run_data(run_dir, task, cfg)
        runs.write_projector(tb_logger.writer, run_dir, trained.item_factors.detach().cpu().numpy(), movies, task.seen[1])
        tb_logger.writer.add_hparams({k: v if not isinstance(v, float) or math.isfinite(v) else str(v)  # -inf: a
                                      for k, v in cfg.items() if k not in ("resume",)},  # file's ranking_min_rating
                                     {f"hparam/{k}": v for k, v in final.items()}, name="hparams")
        tb_logger.close()
        runs.check_events_written(tb_logger, run_dir)
    with runs.saving_into(results, run_dir, tb_logger):
        pictures.run_pictures(results, trained, task.seen, [m["genres"] for m in movies],
                              loader.dataset_name(cfg["dataset"]), untrained=~task.trained_items)
        summary = {**final, "best_epoch": best["epoch"], "epochs_run": epochs_run,
                   "wall_seconds": round(wall_seconds, 2), **runs.describe(cfg, task, model)}
        runs.write_results(results, summary, history.rows, task.plots)
    print(f"{runs.final_line(task, final, best, epochs_run)}; results in {results}/")


def main(argv):
    try:
        cfg = resolve_config(argv)
    except runs.HelpRequested:
        print(runs.help_text(__file__, __doc__, DEFAULTS, ("ranking", RANKING_DEFAULTS), ("files", FILE_DEFAULTS)))
        return 0
    except (ConfigError, loader.DataError) as error:
        runs.report_error(error)
        return 2
    backend = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo"
    with idist.Parallel(backend=backend) as parallel:
        # Ignite's launcher announces "Run '<function training at 0x...>' in 1 processes" at INFO.
        logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)
        error = runs.run_released(parallel, training, cfg)
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        print("interrupted: the checkpoint of the last finished epoch is kept; continue with "
              "--resume=<run folder>", file=sys.stderr)
        return 130
    runs.report_error(error)
    return 1 if isinstance(error, TrainingError) else 2


if __name__ == "__main__":
    status = main(sys.argv[1:])
    gc.freeze()  # what the run built since main() began: nothing left for a collection at exit either
    sys.exit(status)

"""bench/variants.py: the user-side variants of issue 28, and benchmark.py --variant running them."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix

from bench import peers
from bench.variants import ItemBagUsers, ItemItemMixture, TasteCountUsers
from conftest import ROOT
from MFMixTaste import MFMixTaste

# Four users holding 1, 2, 3 and 5 of six items.
CHOSEN = [[0], [1, 2], [0, 3, 4], [0, 1, 2, 4, 5]]
N_ITEMS = 6


def training_matrix(chosen=CHOSEN):
    rows = np.repeat(np.arange(len(chosen)), [len(c) for c in chosen])
    return csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, np.concatenate(chosen))),
                      shape=(len(chosen), N_ITEMS))


def test_a_user_with_few_items_is_one_taste_and_a_richer_one_the_whole_mixture():
    torch.manual_seed(0)
    model = TasteCountUsers(4, N_ITEMS, training_matrix(), dim=3, n_tastes=2, init_std=0.5).eval()
    assert model.taste_counts.tolist() == [1, 1, 1, 2]                           # floor(log2 n), at least 1
    plain = MFMixTaste(4, N_ITEMS, dim=3, n_tastes=2)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "taste_counts"})
    users = torch.arange(4)
    scores, plain_scores = model.score_all(users), plain.eval().score_all(users)
    first_taste = model.tastes[:3, 0] @ model.item_factors.T + model.item_bias \
        + (model.user_bias[:3] + model.global_bias).unsqueeze(1)                 # U_i0 . e_j + biases
    torch.testing.assert_close(scores[:3], first_taste.detach())
    assert not torch.allclose(scores[:3], plain_scores[:3])                       # their second taste counted there
    torch.testing.assert_close(scores[3], plain_scores[3])


def test_a_users_rows_are_the_sum_of_their_items_vectors_and_dropped_only_in_training():
    torch.manual_seed(0)
    model = ItemBagUsers(4, N_ITEMS, training_matrix(), dim=3, n_tastes=2, init_std=0.5)
    vectors = model.item_inputs.detach().view(N_ITEMS, 2, 2, 3)
    expected = torch.stack([vectors[c].sum(0) / len(c) ** 0.5 for c in CHOSEN])  # (4, 2, K, d)
    model.eval()
    torch.testing.assert_close(model.user_rows(torch.tensor([3, 0, 1, 2])), expected[[3, 0, 1, 2]])
    model.train()
    torch.manual_seed(1)
    dropped = model.user_rows(torch.arange(4))
    assert not torch.allclose(dropped, expected)
    assert not model.user_factors.requires_grad                                   # the free rows are not trained


def test_the_item_item_term_is_eases_scores_and_enters_training_as_evaluation():
    torch.manual_seed(0)
    X = training_matrix()
    model = ItemItemMixture(4, N_ITEMS, X, dim=3, n_tastes=2, init_std=0.0)      # zero factors: the term alone
    users = torch.arange(4)
    expected = ItemItemMixture.SCALE * torch.from_numpy(X @ peers.ease(X, ItemItemMixture.L2))
    torch.testing.assert_close(model.score_all(users).detach(), expected.float())
    with torch.no_grad():
        model.user_factors.normal_()
        model.item_factors.normal_()
    positions, items = torch.tensor([0, 3]), torch.tensor([0, 5])
    trained, _ = model(users, return_prior=True, user_counts=torch.ones(4), item_counts=torch.ones(N_ITEMS),
                       positives=(positions, items))
    torch.testing.assert_close(trained, model.score_all(users))
    with pytest.raises(ValueError, match="full softmax"):
        model(users, columns=torch.tensor([0, 1]))


def run_variant(tmp_path, data_dir, *arguments):
    command = [sys.executable, str(ROOT / "benchmark.py"), *arguments, "--dataset=ml-100k",
               f"--data_dir={data_dir}", f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}",
               "--download=False", "--progress=False", "--dim=8", "--batch_size=32", "--ranking_core=10"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_benchmark_runs_a_variant_as_a_train_py_run(tmp_path, synthetic_ml100k):
    done = run_variant(tmp_path, synthetic_ml100k, "--variant=item_bag", "--task=ranking", "--epochs=2",
                       "--run_name=bag")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "bag" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0 <= summary["test_ndcg@10"] <= 1
    model = torch.load(next((tmp_path / "runs" / "bag").glob("best_*.pt")), weights_only=True)
    assert "item_inputs" in model                                                  # the variant was trained


def test_a_user_side_variant_trains_under_the_sampled_softmax(tmp_path, synthetic_ml100k):
    """taste_count and item_bag build the users' rows, which a sampled step reads as a full one:
    a catalogue above the full softmax's threshold (Amazon Beauty's) runs them."""
    done = run_variant(tmp_path, synthetic_ml100k, "--variant=taste_count", "--task=ranking", "--epochs=1",
                       "--softmax_items=64", "--run_name=counts")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "counts" / "summary.json").read_text())
    assert "a softmax over 64 of the" in done.stdout and 0 <= summary["test_ndcg@10"] <= 1


@pytest.mark.parametrize("arguments, message", [
    (["--variant=nope", "--task=ranking"], "not one of taste_count, item_bag, item_item"),
    (["--variant=item_bag"], "needs --task=ranking"),
    (["--variant=item_item", "--task=ranking", "--loss=bpr"], "needs --task=ranking"),
    (["--variant=item_item", "--task=ranking", "--softmax_items=64"], "needs the softmax over every item"),
])
def test_a_variant_that_cannot_run_is_one_clear_error(tmp_path, synthetic_ml100k, arguments, message):
    done = run_variant(tmp_path, synthetic_ml100k, *arguments)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()

import pytest
import torch

import loader
from conftest import mixture_ratings
from MFMixTaste import PRIOR_TERMS, MFMixTaste, Pairs, _MixtureOfTastes


def batch(n_users, n_items, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_users, (size,), generator=g), torch.randint(0, n_items, (size,),
                                                                           generator=g)


def randomised(model, scale=0.5):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model


def reference_weights(model, users, items):
    """Kula's mixture weights with the model's temperature, softmax_k(A_k . e_j / tau), with autograd."""
    logits = torch.einsum("bkd,bd->bk", model.attention[users], model.item_factors[items])
    return torch.softmax(logits / model.temperature, dim=1)


def reference_scores(model, users, items):
    """The model written straight from Kula (2017), with autograd: the contract of forward."""
    tastes = model.tastes[users]                                             # (B, K, d)
    item_vectors = model.item_factors[items]                                 # (B, d)
    weights = reference_weights(model, users, items)
    scores = torch.einsum("bkd,bd->bk", tastes, item_vectors)
    return ((weights * scores).sum(1) + model.global_bias + model.user_bias[users]
            + model.item_bias[items])


def test_shapes_and_weights_sum_to_one_over_tastes():
    model = randomised(MFMixTaste(10, 7, dim=5, n_tastes=3))
    users, items = batch(10, 7)
    assert model(users, items).shape == (64,)
    weights = model.mixture_weights(users, items)
    assert weights.shape == (64, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(64))
    assert (weights > 0).all()


def test_weights_change_with_the_item():
    model = randomised(MFMixTaste(4, 6, dim=5, n_tastes=3))
    users = torch.zeros(6, dtype=torch.long)
    weights = model.mixture_weights(users, torch.arange(6))
    assert (weights - weights[0]).abs().max() > 0.05


def test_forward_matches_the_papers_formula():
    model = randomised(MFMixTaste(10, 7, dim=5, n_tastes=3))
    users, items = batch(10, 7)
    torch.testing.assert_close(model(users, items), reference_scores(model, users, items))


def test_one_taste_is_exactly_biased_matrix_factorisation():
    model = randomised(MFMixTaste(10, 7, dim=5, n_tastes=1))
    users, items = batch(10, 7)
    dot = (model.tastes[users, 0] * model.item_factors[items]).sum(1)
    biased_mf = dot + model.global_bias + model.user_bias[users] + model.item_bias[items]
    torch.testing.assert_close(model(users, items), biased_mf, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.mixture_weights(users, items), torch.ones(64, 1))


def test_hand_written_backward_matches_autograd():
    model = randomised(MFMixTaste(6, 5, dim=3, n_tastes=2)).double()
    users, items = batch(6, 5, size=20)  # repeated indices: gradients must accumulate
    params = (model.user_factors, model.item_factors, model.user_bias, model.item_bias,
              model.global_bias)
    # Uneven prior scales, so the prior's gradient of every row is checked with its own weight.
    scales = torch.rand(6, dtype=torch.double) + 0.1, torch.rand(5, dtype=torch.double) + 0.1
    # With the implicit term's sampled items (repeated too), and without (n = 0).
    for negatives in (torch.randint(0, 5, (20, 3), generator=torch.Generator().manual_seed(1)),
                      torch.empty(20, 0, dtype=torch.long)):
        for temperature in (1.0, 0.4):
            assert torch.autograd.gradcheck(lambda *p, sampled=negatives, tau=temperature: _MixtureOfTastes.apply(
                Pairs(users, items, *scales, sampled, tau, 0.3, False), *p), params)
    # Event weights on the implicit term's pairs (a weighted mean).
    pair_weights = torch.rand(20, dtype=torch.double) + 0.1
    assert torch.autograd.gradcheck(lambda *p: _MixtureOfTastes.apply(
        Pairs(users, items, *scales, negatives, 1.0, 0.3, False, pair_weights), *p), params)


def test_weighted_implicit_term_is_the_weighted_mean_of_its_pairs():
    """pair_weights w: the implicit term is sum_i w_i mean_n softplus(-m_in) / sum_i w_i, so
    whole weights are repeated pairs, and equal weights are the unweighted term."""
    model = randomised(MFMixTaste(6, 5, dim=3, n_tastes=2))
    users, items = batch(6, 5, size=8)
    negatives = torch.randint(0, 5, (8, 3), generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([1.0, 2, 1, 3, 1, 1, 2, 1])
    implicit = model(users, items, return_prior=True, negatives=negatives, pair_weights=weights)[2]
    repeat = torch.repeat_interleave(torch.arange(8), weights.long())
    repeated = model(users[repeat], items[repeat], return_prior=True, negatives=negatives[repeat])[2]
    torch.testing.assert_close(implicit, repeated)
    equal = model(users, items, return_prior=True, negatives=negatives, pair_weights=torch.full((8,), 0.5))[2]
    torch.testing.assert_close(equal, model(users, items, return_prior=True, negatives=negatives)[2])


def test_a_shared_taste_prior_in_the_fused_node_matches_its_definition():
    """share_taste_prior=True: each pair holds its tastes by its mixture weights, sum_k w_k |U_k|^2
    (weights as constants), the other terms as before; forward and the hand-written backward
    agree with that definition written with autograd; with K=1 it is the unshared prior."""
    torch.manual_seed(0)
    model = randomised(MFMixTaste(6, 5, dim=3, n_tastes=3)).double()
    users, items = batch(6, 5, size=20)
    negatives = torch.randint(0, 5, (20, 2), generator=torch.Generator().manual_seed(1))
    user_w, item_w = torch.rand(6, dtype=torch.double) + 0.1, torch.rand(5, dtype=torch.double) + 0.1
    coefficients = torch.rand(20, dtype=torch.double), torch.tensor([0.7, 1.3, 0.4, 2.0], dtype=torch.double)

    def loss(predictions, norms, implicit):
        return predictions @ coefficients[0] + norms @ coefficients[1] + implicit

    fused = model(users, items, return_prior=True, prior_scale=(user_w, item_w), negatives=negatives,
                  implicit_temperature=0.3, share_taste_prior=True)
    loss(*fused).backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    weights = model.mixture_weights(users, items).detach()                       # (B, K)
    uw, iw = user_w[users], item_w[items]
    norms = torch.stack([uw @ (weights * model.tastes[users].pow(2).sum(-1)).sum(1),
                         uw @ model.attention[users].pow(2).sum((1, 2)),
                         iw @ model.item_factors[items].pow(2).sum(1),
                         uw @ model.user_bias[users].pow(2) + iw @ model.item_bias[items].pow(2)]) / len(users)
    reference = (reference_scores(model, users, items), norms,
                 reference_implicit(model, users, items, negatives, t=0.3))
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected)
    loss(*reference).backward()
    for got, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad)
    unshared = model(users, items, return_prior=True, prior_scale=(user_w, item_w))[1]
    assert fused[1][0] < unshared[0]
    torch.testing.assert_close(fused[1][1:], unshared[1:])
    one = randomised(MFMixTaste(6, 5, dim=3, n_tastes=1))
    torch.testing.assert_close(one(users, items, return_prior=True, share_taste_prior=True)[1],
                               one(users, items, return_prior=True)[1])


def reference_implicit(model, users, items, negatives, t=1.0):
    """The implicit term written from its definition, with autograd: mean over the (rated,
    sampled) pairs of -log sigmoid(claim_j - claim_j'), claim_j = t logsumexp_k (A_k.e_j / t)."""
    attention = model.attention[users]                                       # (B, K, d)

    def claim(item_vectors):                                                 # (B, m, d) -> (B, m)
        return t * torch.logsumexp(torch.einsum("bkd,bmd->bmk", attention, item_vectors) / t, -1)
    rated, sampled = claim(model.item_factors[items].unsqueeze(1)), claim(model.item_factors[negatives])
    return -torch.nn.functional.logsigmoid(rated - sampled).mean()


def test_the_implicit_term_matches_its_definition_and_leaves_the_rest_alone():
    model = randomised(MFMixTaste(10, 7, dim=5, n_tastes=3))
    users, items = batch(10, 7)
    negatives = torch.randint(0, 7, (64, 4), generator=torch.Generator().manual_seed(2))
    for t in (0.2, 1.0):
        _, _, implicit = model(users, items, return_prior=True, negatives=negatives, implicit_temperature=t)
        torch.testing.assert_close(implicit, reference_implicit(model, users, items, negatives, t))
    prediction, norms, implicit = model(users, items, return_prior=True, negatives=negatives)
    plain_prediction, plain_norms = model(users, items, return_prior=True)
    torch.testing.assert_close(prediction, plain_prediction, rtol=0, atol=0)
    torch.testing.assert_close(norms, plain_norms, rtol=0, atol=0)
    # Its gradient reaches the attention vectors and the items, never the tastes or biases.
    implicit.backward()
    assert model.user_factors.grad[:, 1].abs().sum() > 0 and model.item_factors.grad.abs().sum() > 0
    assert model.user_factors.grad[:, 0].abs().sum() == 0 and model.user_bias.grad.abs().sum() == 0


def test_prior_terms_are_batch_mean_squared_norms_and_weighted_sum():
    model = randomised(MFMixTaste(10, 7, dim=5, n_tastes=3))
    users, items = batch(10, 7)
    terms = model.prior_terms(users, items)
    assert list(terms) == list(PRIOR_TERMS)
    torch.testing.assert_close(terms["tastes"], model.tastes[users].pow(2).sum((1, 2)).mean())
    torch.testing.assert_close(terms["attention"],
                               model.attention[users].pow(2).sum((1, 2)).mean())
    torch.testing.assert_close(terms["items"], model.item_factors[items].pow(2).sum(1).mean())
    torch.testing.assert_close(terms["biases"], (model.user_bias[users].pow(2)
                                                 + model.item_bias[items].pow(2)).mean())
    _, norms = model(users, items, return_prior=True)
    weights = {"tastes": 1.0, "attention": 0.0, "items": 2.0, "biases": 0.5}
    torch.testing.assert_close(model.l2_prior(norms, weights),
                               terms["tastes"] + 2 * terms["items"] + 0.5 * terms["biases"])
    assert model.l2_prior(norms, weights).dim() == 0


def test_global_bias_starts_at_the_given_mean_and_predictions_near_it():
    model = MFMixTaste(50, 40, global_mean=3.6)
    users, items = batch(50, 40)
    assert (model(users, items) - 3.6).abs().max() < 1e-2


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_tastes=0"):
        MFMixTaste(3, 3, n_tastes=0)


def fit(n_tastes, dim, train, steps=1000, prior=3e-3, seed=0, init_std=0.1):
    torch.manual_seed(seed)
    users, items, ratings = train
    model = MFMixTaste(int(users.max()) + 1, int(items.max()) + 1, dim=dim, n_tastes=n_tastes,
                       global_mean=float(ratings.mean()), init_std=init_std)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    weights = dict.fromkeys(PRIOR_TERMS, prior)
    for _step, (u, i, r, _) in zip(range(steps), _forever(train)):
        predictions, norms = model(u, i, return_prior=True)
        loss = torch.nn.functional.mse_loss(predictions, r) + model.l2_prior(norms, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _forever(tensors):
    batches = loader.BatchIterator(tensors, batch_size=512, seed=0)
    while True:
        yield from batches


def test_learns_a_known_mixture_far_better_than_biases_alone():
    data = loader.encode(*mixture_ratings(n_users=150, n_items=100, n_ratings=9000))
    train_rows, _, test_rows = loader.split(len(data), val_fraction=0.01)
    train, (tu, ti, tr) = data.tensors(train_rows), data.tensors(test_rows)
    mixture, single_taste = fit(3, 4, train), fit(1, 4, train)
    # Factors that start at zero get zero gradients and stay there: only biases learn.
    bias_only = fit(1, 1, train, init_std=0.0)
    assert bias_only.user_factors.abs().max() == 0
    with torch.no_grad():
        mixture_mse = float(((mixture(tu, ti) - tr) ** 2).mean())
        bias_only_mse = float(((bias_only(tu, ti) - tr) ** 2).mean())
        single_taste_mse = float(((single_taste(tu, ti) - tr) ** 2).mean())
    assert mixture_mse < 0.75 * bias_only_mse, (mixture_mse, bias_only_mse)
    # The data is a mixture, so K=3 tastes must also beat one taste of the same size.
    assert mixture_mse < 0.95 * single_taste_mse, (mixture_mse, single_taste_mse)


def test_double_backward_through_the_hand_written_node_raises():
    """The backward is first-order only: a gradient penalty must fail loudly, not be wrong."""
    model = randomised(MFMixTaste(6, 5, dim=3, n_tastes=2))
    users, items = batch(6, 5, size=20)
    loss = (model(users, items) - 3.0).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, model.item_factors, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.pow(2).sum().backward()


def test_an_empty_batch_gives_zero_norms_and_zero_gradients():
    """A process's share of a short last batch can be empty."""
    model = randomised(MFMixTaste(6, 5, dim=3, n_tastes=2))
    empty = torch.zeros(0, dtype=torch.long)
    predictions, norms = model(empty, empty, return_prior=True)
    assert predictions.shape == (0,) and torch.equal(norms, torch.zeros(4))
    (predictions.sum() + norms.sum()).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    # With the implicit term's sampled items too: an empty share has a zero term.
    predictions, norms, implicit = model(empty, empty, return_prior=True,
                                         negatives=torch.zeros(0, 3, dtype=torch.long))
    assert implicit == 0
    model.zero_grad()
    (predictions.sum() + norms.sum() + implicit).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_all_item_scores_and_item_sets_agree_with_pair_scores():
    model = randomised(MFMixTaste(6, 5, dim=3, n_tastes=2))
    users = torch.tensor([0, 3, 5])
    every = model(users)                                                  # (3, 5)
    pairs = model(users.repeat_interleave(5), torch.arange(5).repeat(3)).view(3, 5)
    torch.testing.assert_close(every, pairs)
    torch.testing.assert_close(every, reference_scores(model, users.repeat_interleave(5),
                                                       torch.arange(5).repeat(3)).view(3, 5))
    sets = torch.tensor([[4, 0], [1, 1], [2, 3]])
    torch.testing.assert_close(model(users, sets), every.gather(1, sets))


def test_prior_scale_weights_each_pair_by_its_rows():
    model = randomised(MFMixTaste(10, 7, dim=5, n_tastes=3))
    users, items = batch(10, 7)
    user_scale, item_scale = torch.rand(10), torch.rand(7)
    _, norms = model(users, items, return_prior=True, prior_scale=(user_scale, item_scale))
    user_w, item_w = user_scale[users], item_scale[items]
    torch.testing.assert_close(norms, torch.stack([
        (user_w * model.tastes[users].pow(2).sum((1, 2))).mean(),
        (user_w * model.attention[users].pow(2).sum((1, 2))).mean(),
        (item_w * model.item_factors[items].pow(2).sum(1)).mean(),
        (user_w * model.user_bias[users].pow(2) + item_w * model.item_bias[items].pow(2)).mean()]))


def test_prior_from_counts_equals_the_prior_of_the_pairs():
    model = randomised(MFMixTaste(6, 5, dim=3, n_tastes=2))
    users = torch.tensor([1, 4])
    position, items = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([2, 3, 2, 0, 4])
    _, from_pairs = model(users[position], items, return_prior=True)
    _, from_counts = model(users, return_prior=True, user_counts=torch.tensor([3.0, 2.0]),
                           item_counts=torch.bincount(items, minlength=5).float())
    torch.testing.assert_close(from_counts, from_pairs)
    scale = torch.rand(6), torch.rand(5)
    _, from_pairs = model(users[position], items, return_prior=True, prior_scale=scale)
    _, from_counts = model(users, return_prior=True, user_counts=torch.tensor([3.0, 2.0]),
                           item_counts=torch.bincount(items, minlength=5).float(),
                           prior_scale=scale)
    torch.testing.assert_close(from_counts, from_pairs)


def test_a_zero_weight_on_the_implicit_term_leaves_the_step_exactly_as_without_it():
    """Weight 0 must give the model without the term exactly: the same gradients, bit for bit."""
    model = randomised(MFMixTaste(10, 7, dim=5, n_tastes=3))
    users, items = batch(10, 7)
    targets = torch.rand(64) * 4 + 1
    negatives = torch.randint(0, 7, (64, 3), generator=torch.Generator().manual_seed(3))
    gradients = []
    for sampled in (None, negatives):
        model.zero_grad()
        outputs = model(users, items, return_prior=True, negatives=sampled)
        loss = (outputs[0] - targets).pow(2).mean() + outputs[1].sum()
        if sampled is not None:
            loss = loss + 0.0 * outputs[2]
        loss.backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    for without, with_zero in zip(*gradients):
        assert torch.equal(without, with_zero)


def test_every_scoring_path_is_the_one_mixture_at_a_temperature_and_k_other_than_the_defaults():
    """The mixture is computed in one place (MFMixTaste.mixture): at tau=0.4, K=3, d=5 every path
    agrees with autograd's reference: the training step's fused node (scores, prior and
    gradients, with its shared taste prior), evaluation's pair scores, all-item scores with and
    without autograd, the sampled softmax's positives, mixture_weights and recommend.py's."""
    from recommend import Recommender

    torch.manual_seed(0)
    model = randomised(MFMixTaste(8, 6, dim=5, n_tastes=3, temperature=0.4)).double()
    users, items = batch(8, 6, size=30)
    reference = reference_scores(model, users, items)
    torch.testing.assert_close(model.mixture_weights(users, items), reference_weights(model, users, items))
    with torch.no_grad():
        torch.testing.assert_close(model(users, items), reference)               # evaluation's plain ops
        every = model.score_all(torch.arange(8))                                   # (8, 6), no autograd
    every_grad = model.score_all(torch.arange(8))                                  # with autograd
    pairs = reference_scores(model, torch.arange(8).repeat_interleave(6), torch.arange(6).repeat(8)).view(8, 6)
    torch.testing.assert_close(every, pairs)
    torch.testing.assert_close(every_grad, pairs)
    # The sampled softmax's positives (scored as a sampled product) against the same pairs.
    position, pair_items = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 4, 0, 2, 3, 5])
    chosen = torch.tensor([0, 3, 5])
    counts = torch.bincount(position, minlength=3).double()
    *_, positives = model(chosen, return_prior=True, user_counts=counts, item_counts=torch.ones(6).double(),
                          columns=torch.tensor([1, 2]), positives=(position, pair_items))
    torch.testing.assert_close(positives, pairs[chosen[position], pair_items])
    # The training step: scores, shared prior and gradients against autograd's.
    fused = model(users, items, return_prior=True, share_taste_prior=True)
    (fused[0].sum() + fused[1].sum()).backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    weights = reference_weights(model, users, items).detach()
    norms = torch.stack([(weights * model.tastes[users].pow(2).sum(-1)).sum(1).mean(),
                         model.attention[users].pow(2).sum((1, 2)).mean(), model.item_factors[items].pow(2).sum(1).mean(),
                         (model.user_bias[users].pow(2) + model.item_bias[items].pow(2)).mean()])
    torch.testing.assert_close(fused[0], reference)
    torch.testing.assert_close(fused[1], norms)
    (reference.sum() + norms.sum()).backward()
    for got, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad)
    # recommend.py's answers read the same weights.
    model = model.float()
    answers = Recommender(model, {"task": "ranking"}, torch.arange(8).numpy(), torch.arange(6).numpy(),
                          torch.zeros(9, dtype=torch.long).numpy(), torch.zeros(0, dtype=torch.long).numpy(), None)
    shown, contributions = answers._mixture(2, torch.arange(6))
    with torch.no_grad():
        expected = reference_weights(model, torch.full((6,), 2), torch.arange(6))       # (6, K)
        torch.testing.assert_close(shown, expected.T)
        scores = torch.einsum("kd,jd->kj", model.tastes[2], model.item_factors)
        torch.testing.assert_close(contributions, expected.T * scores)

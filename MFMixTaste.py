"""Mixture-of-tastes matrix factorisation (Kula 2017, "Mixture-of-tastes Models for Representing
Users with Diverse Interests", arXiv:1711.08379).

Each user i has K taste vectors U_i (K x d) and K attention vectors A_i (K x d); item j has one
embedding e_j (d). For a (user, item) pair

    weights_ik = softmax_k(A_ik . e_j / tau)   how much taste k speaks for user i on item j
    score_ij   = sum_k weights_ik * (U_ik . e_j) + b + b_i + b_j

(tau, the mixture's temperature, is 1 in Kula's model and by default; smaller makes one taste
answer alone for each item.) The mixture is computed in one place, mixture(), which every scoring
path calls (training's fused node, evaluation, all-item scores, the sampled softmax's positives,
mixture_weights, and so recommend.py); its derivative, mixture_backward(), stands beside it for
the fused node's hand-written backward.

The softmax runs over the K tastes, never over the d latent dimensions: each taste is a whole
vector switched on or off as a unit, which is what makes it a mixture. With K = 1 the weight is
identically 1 and the model is biased matrix factorisation.

Which movies a user chose to rate says something too (SVD++ built on it; Kula trains the mixture
on exactly that signal). forward(..., negatives=...) also returns an implicit term that asks the
attention vectors to explain the user's choices:

    implicit_ij = t logsumexp_k (A_ik . e_j / t) "one of the user's tastes claims item j"
    term        = mean over (i, j) and j' of -log sigmoid(implicit_ij - implicit_ij')

for each rated (i, j) against sampled items j' (BPR). The temperature t sharpens the claim towards
the single best taste (t -> 0: the max), so that each attention vector answers for a group of the
user's movies instead of all of them sharing every movie. train.py adds the term, weighted, to the
squared error; with weight 0 the model trains exactly as without it.

The module is pure: forward() computes scores, prior_terms() the L2 penalties of a batch; logging,
optimisation and step counting live in train.py.
"""

import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

PRIOR_TERMS = ("tastes", "attention", "items", "biases")


def mixture(taste_scores, logits, dim=-1, temperature=1.0):
    """The mixture of tastes: weights = softmax over the K tastes (dimension dim) of logits /
    temperature, and mixed = sum_k weights_k * taste_scores_k. taste_scores and logits: (..., K,
    ...) alike, U_k . e_j and A_k . e_j. Returns (mixed, weights), mixed without dimension dim.
    Under autograd, torch.softmax; otherwise (evaluation, and the fused node's forward) written
    out in place: torch.softmax on (B, K) slices with small K takes ~4x longer on a CPU."""
    if temperature != 1.0:
        logits = logits / temperature
    if torch.is_grad_enabled() and (logits.requires_grad or taste_scores.requires_grad):
        weights = torch.softmax(logits, dim)
    else:
        weights = (logits - logits.amax(dim, keepdim=True)).exp_()
        weights.div_(weights.sum(dim, keepdim=True))
    return (weights * taste_scores).sum(dim), weights


def mixture_backward(grad_mixed, weights, taste_scores, mixed, temperature=1.0):
    """mixture()'s derivative for (B, K) pairs: d mixed / d taste_score_k = w_k and d mixed /
    d logit_k = w_k (taste_score_k - mixed) / temperature. grad_mixed (B,) -> the gradients of
    taste_scores and logits, (B, K) each."""
    grad_scores = grad_mixed.unsqueeze(-1) * weights                          # (B, K)
    grad_logits = grad_scores * (taste_scores - mixed.unsqueeze(-1))          # (B, K)
    return grad_scores, grad_logits if temperature == 1.0 else grad_logits.div_(temperature)


class Tables(NamedTuple):
    """The model's parameters, as the fused node takes them and returns their gradients."""
    user_factors: torch.Tensor  # (n_users, 2, K, d): [tastes, attention]
    item_factors: torch.Tensor  # (n_items, d)
    user_bias: torch.Tensor     # (n_users,)
    item_bias: torch.Tensor     # (n_items,)
    global_bias: torch.Tensor   # ()


class Pairs(NamedTuple):
    """What the fused node scores and how, none of it learned."""
    users: torch.Tensor       # (B,) int64
    items: torch.Tensor       # (B,) int64
    user_scale: torch.Tensor  # (n_users,): each pair's weight in the prior's means, user side
    item_scale: torch.Tensor  # (n_items,): the same, item side
    negatives: torch.Tensor   # (B, n) int64 items sampled for the implicit term (n = 0: no term)
    temperature: float        # the mixture's (mixture())
    implicit_temperature: float  # t of the implicit term's claim
    share_tastes: bool        # each pair's prior on the tastes is sum_k w_k |U_k|^2 (w constants)
    pair_weights: torch.Tensor | None = None  # (B,) each pair's weight in the implicit term's mean
                              # (--event_weights); None: every pair 1


class _MixtureOfTastes(torch.autograd.Function):
    """Lookup, mixture and batch L2 norms in one autograd node with a hand-written backward.

    Autograd through the plain expression (gathers, bmm, softmax, pow) spends most of a CPU step
    on broadcast kernels and temporaries the size of the batch (profiled: ~2.5 us per rating at
    K=4, d=32). This node computes the same function with one gather per table in the forward and,
    in the backward, one outer product for the tastes and attention rows, one contraction for the
    item rows, and one index_add_ per table, with the prior gradient folded in
    (~0.4 us per rating). torch.compile of the plain expression reached 10 ms per step against
    this node's 6 ms (batch 8192, K=2), after 19 s of compilation. tests/test_model.py checks
    the node against autograd with gradcheck.
    """

    @staticmethod
    def forward(ctx, pairs, *tables):
        # pairs: Pairs; tables: the Tables, passed one by one so that autograd sees each.
        user_factors, item_factors, user_bias, item_bias, global_bias = tables
        users, items, user_scale, item_scale, negatives = pairs[:5]
        batch, n_tastes, dim = users.shape[0], user_factors.shape[2], user_factors.shape[3]
        rows = user_factors.index_select(0, users).view(batch, 2 * n_tastes, dim)  # (B, 2K, d)
        item_rows = item_factors.index_select(0, items)                           # (B, d)
        # One bmm gives both the attention logits and the per-taste scores.
        products = torch.bmm(rows, item_rows.unsqueeze(-1)).squeeze(-1)          # (B, 2K)
        taste_scores, logits = products[:, :n_tastes], products[:, n_tastes:]     # (B, K) each
        mixed, weights = mixture(taste_scores, logits, temperature=pairs.temperature)  # (B,), (B, K)
        user_b, item_b = user_bias.index_select(0, users), item_bias.index_select(0, items)
        prediction = mixed + user_b + item_b + global_bias                        # (B,)

        # Batch means of scaled squared norms, in the order of PRIOR_TERMS.
        user_w, item_w = user_scale.index_select(0, users), item_scale.index_select(0, items)
        if pairs.share_tastes:  # (B, 2K): each row's squared norm, the tastes' weighted by w_k
            row_weights = torch.cat([weights, torch.ones_like(weights)], dim=1)
            row_norms = torch.linalg.vector_norm(rows, dim=-1).square() * row_weights
            row_norms = user_w @ row_norms.view(batch, 2, n_tastes).sum(-1)              # (2,)
        else:
            halves = rows.view(batch, 2, n_tastes * dim)                          # (B, 2, K*d)
            row_norms = user_w @ torch.linalg.vector_norm(halves, dim=-1).square()  # (2,): one read of the rows
        squared_norms = torch.stack([
            row_norms[0], row_norms[1], item_w @ item_rows.pow(2).sum(1),
            user_w @ user_b.pow(2) + item_w @ item_b.pow(2)]) / max(batch, 1)

        # The implicit term: a rated item's claim t logsumexp(logits / t) against each sampled
        # item's. d claim / d logits = softmax(logits / t), the claim's weights over the tastes.
        implicit = negative_rows = negative_weights = claim_weights = margins = rows.new_zeros(())
        if negatives.shape[1]:
            t = pairs.implicit_temperature
            # (B, n, K): the tastes last, so that the reductions over them run on contiguous rows
            # (logsumexp and softmax over a middle dimension took 2-3x longer).
            negative_rows = item_factors.index_select(0, negatives.reshape(-1)).view(*negatives.shape, dim)
            negative_logits = torch.bmm(negative_rows, rows[:, n_tastes:].transpose(1, 2))  # (B, n, K)
            negative_claims, negative_weights = _claim(negative_logits.div_(t))  # (B, n), (B, n, K)
            claims, claim_weights = _claim(logits / t)                           # (B,), (B, K)
            margins = t * (claims.unsqueeze(1) - negative_claims)                # (B, n)
            losses = nn.functional.softplus(-margins)                            # (B, n): -log sigmoid
            if pairs.pair_weights is None:
                implicit = losses.sum() / max(margins.numel(), 1)
            else:  # the mean by weight: a purchase's claim counts more than a view's
                implicit = (pairs.pair_weights @ losses.sum(1)) / (pairs.pair_weights.sum() * negatives.shape[1]).clamp(min=1e-12)

        ctx.save_for_backward(users, items, rows, item_rows, weights, taste_scores, mixed,
                              user_b, item_b, user_w, item_w, negatives, negative_rows,
                              negative_weights, claim_weights, margins)
        ctx.table_shapes = (user_factors.shape, item_factors.shape, user_bias.shape,
                            item_bias.shape)
        ctx.share_tastes, ctx.temperature = pairs.share_tastes, pairs.temperature
        ctx.pair_weights = pairs.pair_weights  # not a table: no gradient
        return prediction, squared_norms, implicit

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: double backward raises
    def backward(ctx, grad_prediction, grad_norms, grad_implicit):
        users, items, rows, item_rows, weights, taste_scores, mixed, user_b, item_b, user_w, \
            item_w, negatives, negative_rows, negative_weights, claim_weights, margins = ctx.saved_tensors
        batch, two_k, _ = rows.shape
        n_tastes = two_k // 2
        # An empty batch (a process's share of a short last batch) has zero norms and gradients.
        norm_coef = grad_norms * (2.0 / max(batch, 1))                            # (4,)

        # d / d taste_k = grad_scores_k e ;  d / d attention_k = grad_logits_k e
        grad_scores, grad_logits = mixture_backward(grad_prediction, weights, taste_scores, mixed,
                                                    ctx.temperature)               # (B, K) each
        if negatives.shape[1]:  # the implicit term: d softplus(-m) / d m = -sigmoid(-m)
            if ctx.pair_weights is None:
                grad_margins = torch.sigmoid(-margins).mul_(-grad_implicit / max(margins.numel(), 1))  # (B, n)
            else:
                total = (ctx.pair_weights.sum() * margins.shape[1]).clamp(min=1e-12)
                grad_margins = torch.sigmoid(-margins).mul_((-grad_implicit / total) * ctx.pair_weights.unsqueeze(1))
            grad_logits.addcmul_(grad_margins.sum(1, keepdim=True), claim_weights)  # the rated item's side
            grad_negative_logits = negative_weights * -grad_margins.unsqueeze(2)  # (B, n, K)
        grad_products = torch.cat([grad_scores, grad_logits], dim=1)              # (B, 2K)
        row_coef = torch.cat([norm_coef[0].expand(n_tastes), norm_coef[1].expand(n_tastes)]).view(1, two_k)
        if ctx.share_tastes:  # a taste's prior gradient scaled by its weight (no gradient to w)
            row_coef = row_coef * torch.cat([weights, torch.ones_like(weights)], dim=1)
        grad_rows = _outer_plus(grad_products, item_rows, rows, row_coef * user_w.view(batch, 1))  # (B, 2K, d)
        if negatives.shape[1]:  # the sampled items' side, on the attention rows and those items
            _sum_of_outer(grad_negative_logits.transpose(1, 2), negative_rows, out=grad_rows[:, n_tastes:])  # (B, K, d)
            grad_negative_rows = _sum_of_outer(grad_negative_logits, rows[:, n_tastes:])  # (B, n, d)
        # sum_k grad_products_k * rows_k, as multiply-adds over k (_sum_of_outer says why)
        grad_item_rows = _sum_of_outer(grad_products.unsqueeze(1), rows).squeeze(1)  # (B, d)
        grad_item_rows.addcmul_(item_rows, (norm_coef[2] * item_w).unsqueeze(1))
        grad_user_b = grad_prediction + norm_coef[3] * user_w * user_b            # (B,)
        grad_item_b = grad_prediction + norm_coef[3] * item_w * item_b

        # Scatter into dense table gradients: index_add_ is several times faster on CPU than
        # the sort-based embedding backward, and repeated indices accumulate.
        factors_shape, items_shape, user_b_shape, item_b_shape = ctx.table_shapes
        grad_user_factors = rows.new_zeros(factors_shape).index_add_(
            0, users, grad_rows.view(batch, *factors_shape[1:]))
        grad_item_factors = rows.new_zeros(items_shape).index_add_(0, items, grad_item_rows)
        if negatives.shape[1]:
            grad_item_factors.index_add_(0, negatives.reshape(-1), grad_negative_rows.reshape(-1, rows.shape[2]))
        grad_user_bias = rows.new_zeros(user_b_shape).index_add_(0, users, grad_user_b)
        grad_item_bias = rows.new_zeros(item_b_shape).index_add_(0, items, grad_item_b)
        return (None, *Tables(user_factors=grad_user_factors, item_factors=grad_item_factors,
                              user_bias=grad_user_bias, item_bias=grad_item_bias,
                              global_bias=grad_prediction.sum()))


def _claim(logits):
    """logsumexp and softmax over the last dimension (the K tastes) in one pass: (..., K) ->
    (...), (..., K). torch.logsumexp and torch.softmax each exponentiate again; for a few tastes
    this is about half their time together."""
    peak = logits.amax(-1, keepdim=True)
    weights = (logits - peak).exp_()
    total = weights.sum(-1, keepdim=True)
    return (peak + total.log()).squeeze(-1), weights.div_(total)


def _outer_plus(coefficients, vector, rows, row_coefficients):
    """(B, P) coefficients, (B, d) vector, (B, P, d) rows and (B, P) row_coefficients ->
    (B, P, d): coefficient[p] * vector + row_coefficient[p] * rows[p]. Written per p into one
    output: batch-sized temporaries cost more in memory traffic than in arithmetic here."""
    out = rows * row_coefficients.unsqueeze(-1)
    for p in range(rows.shape[1]):
        out[:, p].addcmul_(vector, coefficients[:, p, None])
    return out


def _sum_of_outer(coefficients, vectors, out=None):
    """(B, P, Q) coefficients and (B, Q, d) vectors -> (B, P, d): sum over q of coefficient[p, q]
    times vector q, i.e. bmm(coefficients, vectors), added to out (B, P, d) in place when given.
    With Q and P a few (the tastes K, the sampled items n), bmm runs 2-3x slower on CPU than this
    loop of broadcast multiply-adds over q."""
    first = 0
    if out is None:
        out, first = coefficients[:, :, 0, None] * vectors[:, 0, None, :], 1
    for q in range(first, vectors.shape[1]):
        out.addcmul_(coefficients[:, :, q, None], vectors[:, q, None, :])
    return out


def native_bfloat16(device):
    """Whether the device computes bfloat16 matrix products natively, so that the full-softmax
    products of training may run under bfloat16 autocast: on an AMD EPYC with AVX512-BF16 they
    take a fifth of their float32 time. Where bfloat16 is emulated it is slower than float32;
    where it is native a CPU's float32 can still be faster (tasks.bfloat16_products measures)."""
    device = torch.device(device)
    if device.type == "cuda":
        # Native bfloat16 matrix units from compute capability 8 (Ampere) on. torch's
        # is_bf16_supported() also says yes where bfloat16 is emulated (V100, T4), and asks the
        # current device, which need not be the run's; on ROCm it says yes for every GPU, so
        # there "auto" keeps float32 (--mixed_precision=bfloat16 asks for it).
        return not torch.version.hip and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":  # torch's own CPU feature probes (private, hence the defaults)
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


SCORE_CHUNK = 1024  # items per step of score_all (see there)
# _positive_scores' sampled product builds a sparse CSR pattern; torch says once per process that
# CSR support is "in beta", which a run's log need not repeat.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class MFMixTaste(nn.Module):
    def __init__(self, n_users, n_items, dim=32, n_tastes=4, global_mean=0.0, init_std=0.01, temperature=1.0):
        """n_users, n_items: sizes of the contiguous index spaces (see loader.IdMap).
        dim: latent dimension d.  n_tastes: K, tastes per user (1 = biased MF).
        temperature: the mixture's tau (mixture()): 1 is Kula's softmax.
        global_mean: the initial global bias. Starting at the training mean lets the first steps
            learn deviations instead of spending themselves on moving one scalar to ~3.6.
        init_std: std of every factor at start. Small on purpose: each dot product starts with
            std ~ init_std^2 * sqrt(d) (~1e-3), so predictions start at the biases and factors
            grow only as far as the data asks; attention logits start near 0, so each taste
            starts with weight 1/K, and the tastes are told apart by their random directions.
        """
        super().__init__()
        if min(n_users, n_items, dim, n_tastes) < 1:
            raise ValueError(f"MFMixTaste needs positive sizes, got n_users={n_users}, "
                             f"n_items={n_items}, dim={dim}, n_tastes={n_tastes}")
        if not temperature > 0:
            raise ValueError(f"MFMixTaste's mixture temperature must be positive, got {temperature}")
        self.n_users, self.n_items, self.dim, self.n_tastes = n_users, n_items, dim, n_tastes
        self.temperature = float(temperature)
        # user_factors[i, 0] = U_i (K, d) tastes, user_factors[i, 1] = A_i (K, d) attention: one
        # table so that a batch needs one gather and one scatter for both.
        self.user_factors = nn.Parameter(torch.randn(n_users, 2, n_tastes, dim) * init_std)
        self.item_factors = nn.Parameter(torch.randn(n_items, dim) * init_std)   # e_j
        self.user_bias = nn.Parameter(torch.zeros(n_users))
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        self.global_bias = nn.Parameter(torch.tensor(float(global_mean)))

    @property
    def tastes(self):
        """(n_users, K, d) taste vectors U."""
        return self.user_factors[:, 0]

    @property
    def attention(self):
        """(n_users, K, d) attention vectors A."""
        return self.user_factors[:, 1]

    def forward(self, users, items=None, return_prior=False, user_counts=None, item_counts=None,
                prior_scale=None, negatives=None, implicit_temperature=1.0, share_taste_prior=False,
                positives=None, columns=None, pair_weights=None):
        """Scores of (user, item) pairs, or of all items.

        users: (B,) int64. items: (B,) -> scores (B,); (B, m) -> scores (B, m) of m items per
        user (a positive and its sampled negatives); None -> scores (B, n_items) of every item
        (score_all). With return_prior, also the (4,) batch means over the pairs of |U_i|^2,
        |A_i|^2, |e_j|^2 and b_i^2 + b_j^2, in the order of PRIOR_TERMS; for all items, over
        the pairs given by user_counts (B,) and item_counts (n_items,) (_weighted_squared_norms).
        prior_scale: None, or (user_scale (n_users,), item_scale (n_items,)) weighting each
        pair's user-side and item-side terms. Unscaled, a row is counted once per pair that uses
        it (the classic SGD-MF regulariser: a row's prior grows with its data); scaled by one
        over the pairs a row has in an epoch, each row is counted once per epoch, a fixed
        Gaussian prior (train.py's prior_per). negatives: (B, n) sampled items, with items (B,)
        and return_prior: then also the implicit term (a scalar, see the module's docstring, with
        t = implicit_temperature) as a third output. share_taste_prior: each pair's prior on the
        tastes is shared among them by its mixture weights (taste k is held by the pairs it
        serves, sum over j of w_ijk |U_ik|^2) instead of counted in full for every taste; the
        weights enter as constants (no gradient through the prior to the attention). With K=1
        the two are equal. Shared, K tastes that agree cost what one taste costs; counted for
        every taste, two equal tastes cost twice one: a K=2 whose tastes agree is K=1 under
        twice the prior. With items None, sharing needs the pairs user_counts counts as
        positives, (position in users (P,), item (P,)). columns: with items None, (C,) item
        indices to score instead of all items (a sampled softmax): scores (B, C), and the
        positives' own scores (P,) as a third output. pair_weights: (B,) each pair's weight in
        the implicit term's mean (event weights), None: all 1.
        Everything a training step needs comes out of one forward call, which is what
        DistributedDataParallel's hooks watch."""
        user_scale, item_scale = prior_scale or (self.user_bias.new_ones(self.n_users),
                                                 self.item_bias.new_ones(self.n_items))
        if items is None:
            # The batch's user rows gathered once for the scores and the prior: each gather's
            # backward zeroes a gradient the size of the whole user table.
            rows, user_b = self.user_rows(users), self.user_bias.index_select(0, users)
            scores, weights = self._scores_of_all_items(rows, user_b, return_weights=True,
                                                        columns=slice(None) if columns is None else columns)
            if not return_prior:
                return scores
            if columns is not None:  # the positives are not among the columns: scored as pairs
                position, pair_items = positives
                pair_scores, positive_weights = self._positive_scores(rows, user_b, position, pair_items)
            batch_scale, taste_counts = user_scale[users], None                       # (B,)
            if share_taste_prior:  # the pairs' shares of each taste, summed per user: (B, K)
                position, pair_items = positives
                shares = (weights.detach()[position, :, pair_items] if columns is None
                          else positive_weights.detach()).float()                            # (P, K)
                taste_counts = shares.new_zeros(len(users), self.n_tastes).index_add_(0, position, shares) \
                    * batch_scale.unsqueeze(1)
            squared_norms = self._weighted_squared_norms(
                rows, user_b, user_counts * batch_scale, item_counts * item_scale,
                total=user_counts.sum(), taste_counts=taste_counts)
            return (scores, squared_norms) if columns is None else (scores, squared_norms, pair_scores)
        pair_users = users if items.dim() == 1 else users.unsqueeze(1).expand_as(items).reshape(-1)
        if not return_prior and not torch.is_grad_enabled():  # evaluation: no norms, no saved tensors
            return self._pair_scores(pair_users, items.reshape(-1)).view(items.shape)
        pairs = Pairs(pair_users, items.reshape(-1), user_scale, item_scale,
                      pair_users.new_empty((len(pair_users), 0)) if negatives is None else negatives,
                      self.temperature, float(implicit_temperature), share_taste_prior, pair_weights)
        prediction, squared_norms, implicit = _MixtureOfTastes.apply(pairs, *self.tables())
        prediction = prediction.view(items.shape)
        if negatives is not None:
            return prediction, squared_norms, implicit
        return (prediction, squared_norms) if return_prior else prediction

    def tables(self):
        """The parameters as the fused node takes them (Tables)."""
        return Tables(self.user_factors, self.item_factors, self.user_bias, self.item_bias, self.global_bias)

    @classmethod
    def from_config(cls, config, n_users, n_items, global_mean=0.0):
        """The model of a run's settings (train.py's knobs, or a finished run's config.json):
        the one place a model is built from them, by train.py and recommend.py alike. A
        config.json written before a knob existed builds that knob's default."""
        return cls(n_users, n_items, dim=config["dim"], n_tastes=config["n_tastes"], global_mean=global_mean,
                   init_std=config.get("init_std", 0.01), temperature=config.get("mixture_temperature", 1.0))

    def user_rows(self, users):
        """(B, 2, K, d) tastes and attention vectors of the users (B,) int64, as every scoring of
        all items reads them (the ranking task's training and evaluation): a variant that builds
        its users another way overrides this (bench/variants.py). The pairs' scores of the rating task
        read user_factors in _MixtureOfTastes directly."""
        return self.user_factors.index_select(0, users)

    def _pair_scores(self, users, items):
        """forward's scores of (user, item) pairs, (B,) each, without the prior's norms or anything
        kept for a backward: the same formula with plain ops (about 30% faster for evaluation)."""
        mixed, _, _ = self.pair_mixture(users, items)
        return mixed + self.user_bias.index_select(0, users) + self.item_bias.index_select(0, items) + self.global_bias

    def pair_mixture(self, users, items):
        """The mixture of (user, item) pairs, users and items (B,) int64: (mixed (B,), weights
        (B, K), taste_scores (B, K)): what each taste scores, U_k . e_j, and its weight."""
        rows = self.user_factors.index_select(0, users).view(len(users), 2 * self.n_tastes, self.dim)
        products = torch.bmm(rows, self.item_factors.index_select(0, items).unsqueeze(-1)).squeeze(-1)
        taste_scores, logits = products[:, :self.n_tastes], products[:, self.n_tastes:]   # (B, K)
        mixed, weights = mixture(taste_scores, logits, temperature=self.temperature)
        return mixed, weights, taste_scores

    def _positive_scores(self, rows, user_b, position, items):
        """The scores (P,) and mixture weights (P, K) of distinct pairs given as a position in
        the users whose rows (B, 2, K, d) and biases (B,) are given, and an item: forward's
        formula with autograd ops, for the positives of a sampled softmax.
        The 2K products of each pair are one sampled matrix product (torch.sparse.sampled_addmm:
        the (B*2K, d) rows times the (d, n_items) item vectors, only where a row's user has the
        item): gathering every pair's user rows instead moved P x 2K x d floats, 3.5x the time
        of a step's pairs (1,727 users, 210k pairs, d=160)."""
        batch, vectors = len(rows), 2 * self.n_tastes
        order = torch.argsort(position * self.n_items + items)  # CSR wants rows in order, columns sorted
        sorted_position, sorted_items = position[order], items[order]
        per_user = torch.bincount(sorted_position, minlength=batch)                    # (B,)
        user_start = torch.cumsum(per_user, 0) - per_user
        # Row b*2K + r of the pattern holds user b's items, for each of its 2K vectors r.
        per_row = per_user.repeat_interleave(vectors)                                  # (B*2K,)
        row_start = torch.cumsum(per_row, 0) - per_row
        crow = torch.cat([row_start, row_start.new_tensor([int(per_row.sum())])])
        within = torch.arange(len(crow) - 1, device=rows.device).repeat_interleave(per_row)
        column_index = user_start.repeat_interleave(vectors)[within] + \
            torch.arange(int(per_row.sum()), device=rows.device) - row_start[within]
        pattern = torch.sparse_csr_tensor(crow, sorted_items[column_index], rows.new_zeros(int(per_row.sum())),
                                          size=(batch * vectors, self.n_items), check_invariants=False)
        values = torch.sparse.sampled_addmm(pattern, rows.reshape(batch * vectors, self.dim),
                                            self.item_factors.T, beta=0.0).values()
        # Pair p (in sorted order) of user b, vector r: values[row_start[b*2K + r] + p - user_start[b]].
        offset = torch.arange(len(order), device=rows.device) - user_start[sorted_position]
        where = row_start.view(batch, vectors)[sorted_position] + offset.unsqueeze(1)     # (P, 2K)
        products = torch.empty_like(where, dtype=values.dtype).index_put_((order,), values[where])
        taste_scores, logits = products[:, :self.n_tastes], products[:, self.n_tastes:]   # (P, K)
        mixed, weights = mixture(taste_scores, logits, temperature=self.temperature)
        scores = mixed + self.item_bias.index_select(0, items) + user_b.index_select(0, position) + self.global_bias
        return scores, weights

    def score_all(self, users):
        """Scores of every item for each user: (B, n_items), for ranking. The same formula as
        forward, for all items at once with plain autograd ops:
            weights (B, K, n) = softmax over K of A_u e_j,  scores = sum_k weights * U_u e_j + biases
        One matrix product serves tastes and attention (their rows sit side by side in
        user_factors). Temporaries are B x 2K x n_items floats: score users in blocks. Under
        bfloat16 autocast the product and the mixture are bfloat16, the biases' sum float32.
        The items are scored SCORE_CHUNK at a time: the (B, 2K, chunk) temporaries then stay in
        the processor's cache instead of going through memory four times (1024 users, K=2, d=160:
        59,047 items 1.0-1.2 s instead of 2.2 s; ML-1M's 3,706 the same time either way)."""
        rows, user_b = self.user_rows(users), self.user_bias[users]
        return torch.cat([self._scores_of_all_items(rows, user_b, columns=slice(start, start + SCORE_CHUNK))
                          for start in range(0, self.n_items, SCORE_CHUNK)], dim=1)

    def score_rows(self, rows, user_b, return_weights=False):
        """score_all for users given by their rows (B, 2, K, d), laid out as user_factors', and
        biases (B,) instead of their indices: users folded in (recommend.py), with autograd.
        -> (B, n_items) scores; with return_weights, also the mixture weights (B, K, n_items)."""
        chunks = [self._scores_of_all_items(rows, user_b, return_weights=True, columns=slice(start, start + SCORE_CHUNK))
                  for start in range(0, self.n_items, SCORE_CHUNK)]
        scores = torch.cat([scores for scores, _ in chunks], dim=1)
        return (scores, torch.cat([weights for _, weights in chunks], dim=2)) if return_weights else scores

    def _scores_of_all_items(self, rows, user_b, return_weights=False, columns=slice(None)):
        """score_all from the users' rows (B, 2, K, d) of user_factors and biases (B,), of the
        items in columns (a slice or an index tensor of C items; default all): (B, C); with
        return_weights, also the mixture weights (B, K, C)."""
        item_factors, item_bias = self.item_factors[columns], self.item_bias[columns]
        batch, n_items = len(rows), len(item_factors)
        products = (rows.view(-1, self.dim) @ item_factors.T).view(batch, 2, self.n_tastes, n_items)
        taste_scores, logits = products.unbind(1)                                  # (B, K, C)
        # The mixture over K of a contiguous copy: on the strided view, softmax and its backward
        # take 2-4x longer (measured at B=1024, K=2, ML-1M's 3123 items).
        mixed, weights = mixture(taste_scores, logits.contiguous(), dim=1, temperature=self.temperature)  # (B, C), (B, K, C)
        scores = mixed + item_bias + (user_b + self.global_bias).unsqueeze(1)
        return (scores, weights) if return_weights else scores

    def _weighted_squared_norms(self, rows, user_b, user_counts, item_counts, total=None, taste_counts=None):
        """The (4,) squared norms of forward(..., return_prior=True) for a set of pairs given by
        counts: the users' rows (B, 2, K, d) of user_factors and biases (B,) with user_counts (B,)
        pairs each, and item_counts (n_items,) pairs per item, divided by total (default: the
        number of pairs, user_counts.sum()); taste_counts (B, K), if given, count the pairs of
        each taste apart (forward's positives). Equal to forward's on those pairs, at O(B +
        n_items) cost instead of O(pairs). Products and sums written elementwise, not as matrix
        products: under bfloat16 autocast (train.py's mixed_precision) they stay in float32."""
        total = (user_counts.sum() if total is None else total).clamp(min=1)
        user_rows = rows.pow(2).sum((2, 3))                                        # (B, 2)
        tastes, attention = (user_counts.unsqueeze(1) * user_rows).sum(0)
        if taste_counts is not None:
            tastes = (taste_counts * rows[:, 0].pow(2).sum(-1)).sum()
        items = (item_counts * self.item_factors.pow(2).sum(1)).sum()
        biases = (user_counts * user_b.pow(2)).sum() + (item_counts * self.item_bias.pow(2)).sum()
        return torch.stack([tastes, attention, items, biases]) / total

    def prior_terms(self, users, items):
        """The batch's squared norms as {name: scalar tensor}, names as in PRIOR_TERMS."""
        return dict(zip(PRIOR_TERMS, self(users, items, return_prior=True)[1]))

    def l2_prior(self, squared_norms, weights):
        """The L2 prior as one scalar tensor: sum over PRIOR_TERMS of weight * squared norm.
        squared_norms: the (4,) tensor of forward(..., return_prior=True); weights: {name: float}."""
        return squared_norms @ squared_norms.new_tensor([weights[name] for name in PRIOR_TERMS])

    def mixture_weights(self, users, items):
        """(B, K) mixture weights over the K tastes for each pair; each row sums to 1."""
        return self.pair_mixture(users, items)[1]

    def extra_repr(self):
        return (f"n_users={self.n_users}, n_items={self.n_items}, dim={self.dim}, "
                f"n_tastes={self.n_tastes}" + (f", temperature={self.temperature:g}" if self.temperature != 1.0 else ""))

"""Tests of evlp.eval retrieval recall@k: hand-built score tables, CLIP_benchmark and brute-force references with exact
ties, chunking invariance, and the chance level (closed form and Monte Carlo)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evlp.eval import chance_retrieval_metrics, retrieval_hits, retrieval_metrics
from evlp.eval.retrieval import rank_counts
from tests.needs import CLIP_BENCHMARK, need_module

KS = (1, 5, 10)
KEYS = {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"}


def from_scores(scores) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose (N, M) image x text score matrix is exactly ``scores``: one-hot images, texts = scores^T."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return torch.eye(scores.shape[0]), scores.T.contiguous()


def tied_set(seed: int, n_images: int = 40, dim: int = 4, levels: int = 1) -> tuple[torch.Tensor, ...]:
    """Integer-valued embeddings (entries in [-levels, levels]): every score is an exact small integer whatever the
    summation order, so ties are exact and identical under any chunking. Captions are shuffled (not grouped by image),
    some are copies of other captions or of their image, and image 0 has no caption."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(-levels, levels + 1, (n_images, dim), generator=g).float()
    images[1] = images[2]  # duplicated image
    captions_per_image = torch.randint(1, 6, (n_images,), generator=g)
    captions_per_image[0] = 0
    text_to_image = torch.repeat_interleave(torch.arange(n_images), captions_per_image)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=g)]
    texts = torch.randint(-levels, levels + 1, (len(text_to_image), dim), generator=g).float()
    texts[::4] = images[text_to_image[::4]]  # a caption identical to its image's embedding
    texts[1::7] = texts[0]  # duplicated captions across images
    return images, texts, text_to_image


def gaussian_set(seed: int, n_images: int, dim: int = 16) -> tuple[torch.Tensor, ...]:
    """Unit embeddings in general position (no ties), 1-5 captions per image, captions shuffled."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    captions_per_image = torch.randint(1, 6, (n_images,), generator=g)
    text_to_image = torch.repeat_interleave(torch.arange(n_images), captions_per_image)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=g)]
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(len(text_to_image), dim, generator=g), dim=-1)
    return images, texts, text_to_image


def topk_reference_hits(images, texts, text_to_image, ks=KS) -> tuple[torch.Tensor, torch.Tensor]:
    """Full score matrix, one ``torch.topk`` per query and k: the tie convention, without chunks or candidates."""
    scores = images @ texts.T  # (N, M)
    n_img, n_txt = scores.shape
    tr = torch.tensor(
        [[bool((text_to_image[scores[i].topk(min(k, n_txt)).indices] == i).any()) for i in range(n_img)] for k in ks]
    )
    ir = torch.tensor(
        [[bool((scores[:, j].topk(min(k, n_img)).indices == text_to_image[j]).any()) for j in range(n_txt)] for k in ks]
    )
    return tr, ir


def rank_reference_hits(images, texts, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    """Without ties, a query hits at k iff fewer than k negatives outscore its best positive."""
    scores = images @ texts.T  # (N, M)
    positive = text_to_image[None, :] == torch.arange(len(images))[:, None]  # (N, M)
    best_caption = scores.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)  # (N, 1)
    tr_rank = ((scores > best_caption) & ~positive).sum(dim=1)  # (N,)
    own_image = scores[text_to_image, torch.arange(len(texts))]  # (M,)
    ir_rank = ((scores > own_image[None, :]) & ~positive).sum(dim=0)  # (M,)
    return torch.stack([tr_rank < k for k in KS]), torch.stack([ir_rank < k for k in KS])


def clip_benchmark_hits(images, texts, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query hits exactly as clip_benchmark.metrics.zeroshot_retrieval.evaluate computes them."""
    zr = need_module("clip_benchmark.metrics.zeroshot_retrieval", CLIP_BENCHMARK)
    scores = texts @ images.T  # (M, N), as in evaluate()
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    batch_size = 16  # evaluate() batches by its loader's batch size
    ir = torch.stack([zr.batchify(zr.recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0 for k in KS])
    tr = torch.stack([zr.batchify(zr.recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0 for k in KS])
    return tr, ir


def assert_metrics(actual: dict, expected: dict) -> None:
    assert set(actual) == KEYS
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key


# ----------------------------------------------------------------------------------------------------------------------
# Hand-built cases


def test_three_images_two_captions_each():
    # Rows: images; columns: captions t0..t5 with text_to_image [0, 0, 1, 1, 2, 2].
    scores = [
        [0.9, 0.2, 0.6, 0.0, 0.0, 0.5],  # image 0: best is t0 (its own)
        [0.1, 0.8, 0.5, 0.3, 0.0, 0.0],  # image 1: best t1 (image 0's), then t2 (its own): miss @1, hit @5
        [0.0, 0.0, 0.0, 0.7, 1.0, 0.4],  # image 2: best is t4 (its own)
    ]
    # Columns, best image: t0 -> 0 (right), t1 -> 1 (wrong), t2 -> 0 (wrong), t3 -> 2 (wrong), t4 -> 2 (right),
    # t5 -> 0 (wrong). With 3 images, k = 5 and 10 retrieve all of them.
    images, texts = from_scores(scores)
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert_metrics(
        metrics, {"TR@1": 200 / 3, "TR@5": 100.0, "TR@10": 100.0, "IR@1": 100 / 3, "IR@5": 100.0, "IR@10": 100.0}
    )


def test_caption_ranked_seventh_hits_only_at_10():
    # Image 0 has one caption (t0); image 1 has t1..t11. Six of image 1's captions outscore t0 for image 0.
    row0 = [0.5, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.45, 0.4, 0.35, 0.3, 0.25]
    row1 = [0.0, 0.6, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    # Text -> image: t0 goes to image 0 (0.5 > 0); t_j to image 1 iff row1 > row0, true for t7..t11 only.
    images, texts = from_scores([row0, row1])
    metrics = retrieval_metrics(images, texts, torch.tensor([0] + [1] * 11))
    assert_metrics(metrics, {"TR@1": 50.0, "TR@5": 50.0, "TR@10": 100.0, "IR@1": 50.0, "IR@5": 100.0, "IR@10": 100.0})


def test_image_without_caption_is_a_miss():
    # As in CLIP_benchmark (0 of 0 positives retrieved counts as no hit), the image stays in the TR denominator.
    images, texts = from_scores([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 1]))
    assert_metrics(metrics, {"TR@1": 200 / 3, "TR@10": 200 / 3, "IR@1": 100.0})


def test_ties_not_crossing_the_k_boundary_are_unambiguous():
    # Image 0's captions t0, t1 tie with each other at the top: a hit at every k whichever topk keeps.
    # Image 1: t2 (its own) ties with t0 and t1 at 0.5 for places 1-3; any top-1 pick among three is possible, but
    # places 1-5 hold all three, so TR@5 is a hit; TR@1 is whatever torch.topk keeps.
    image_1_row = [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    images, texts = from_scores([[0.9, 0.9, 0.1, 0.0, 0.0, 0.0], image_1_row])
    tr, _ = retrieval_hits(images, texts, torch.tensor([0, 0, 1, 0, 0, 0]))
    assert tr[:, 0].all() and tr[1:, 1].all()
    assert tr[0, 1] == (torch.tensor(image_1_row).topk(1).indices.item() == 2)


# ----------------------------------------------------------------------------------------------------------------------
# References: CLIP_benchmark and brute force, ties included


@pytest.mark.parametrize(("seed", "dim", "levels"), [(0, 4, 1), (1, 4, 1), (2, 16, 2)])
def test_equals_clip_benchmark_with_exact_ties(seed, dim, levels):
    images, texts, text_to_image = tied_set(seed, dim=dim, levels=levels)
    tr, ir = retrieval_hits(images, texts, text_to_image, chunk_size=7)
    expected_tr, expected_ir = clip_benchmark_hits(images, texts, text_to_image)
    assert torch.equal(tr, expected_tr)
    assert torch.equal(ir, expected_ir)


@pytest.mark.parametrize(("seed", "dim", "levels"), [(0, 4, 1), (3, 8, 2)])
def test_equals_topk_reference_with_exact_ties(seed, dim, levels):
    images, texts, text_to_image = tied_set(seed, dim=dim, levels=levels)
    tr, ir = retrieval_hits(images, texts, text_to_image, chunk_size=7)
    expected_tr, expected_ir = topk_reference_hits(images, texts, text_to_image)
    assert torch.equal(tr, expected_tr)
    assert torch.equal(ir, expected_ir)
    metrics = retrieval_metrics(images, texts, text_to_image)
    for i, k in enumerate(KS):
        assert metrics[f"TR@{k}"] == pytest.approx(100 * expected_tr[i].float().mean().item())
        assert metrics[f"IR@{k}"] == pytest.approx(100 * expected_ir[i].float().mean().item())


def test_equals_rank_reference_without_ties():
    images, texts, text_to_image = gaussian_set(seed=4, n_images=60)
    tr, ir = retrieval_hits(images, texts, text_to_image, chunk_size=16)
    expected_tr, expected_ir = rank_reference_hits(images, texts, text_to_image)
    assert torch.equal(tr, expected_tr)
    assert torch.equal(ir, expected_ir)
    assert 0 < tr[0].sum() < len(images) and 0 < ir[0].sum() < len(texts)  # neither trivial nor hopeless


@pytest.mark.parametrize("seed", [0, 5])
def test_chunk_size_does_not_change_results(seed):
    images, texts, text_to_image = tied_set(seed, dim=4, levels=1)
    results = [retrieval_hits(images, texts, text_to_image, chunk_size=c) for c in (1, 7, len(images))]
    for tr, ir in results[1:]:
        assert torch.equal(tr, results[0][0]) and torch.equal(ir, results[0][1])


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_rank_counts_equal_brute_force(chunk_size):
    # Candidates strictly above / exactly at each query's best positive, on the full matrix: what decides every hit.
    images, texts, text_to_image = tied_set(2, dim=4, levels=1)
    scores = images @ texts.T  # (N, M), exact small integers
    positive = text_to_image[None, :] == torch.arange(len(images))[:, None]
    best_caption = scores.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)  # -inf: image 0, no caption
    own_image = scores[text_to_image, torch.arange(len(texts))][None, :]
    expected = [(scores > best_caption).sum(1), (scores == best_caption).sum(1), (scores > own_image).sum(0),
                (scores == own_image).sum(0)]
    for actual, wanted in zip(rank_counts(images, texts, text_to_image, chunk_size), expected):
        assert torch.equal(actual, wanted)
    assert expected[1][1:].min() >= 1 and expected[1].max() > 1 and expected[3].max() > 1  # ties, image 0 aside


def test_fewer_candidates_than_k_retrieve_everything():
    images, texts, text_to_image = gaussian_set(seed=6, n_images=4)  # 4 images, at most 20 captions
    ks = (4, 10, 100)
    tr, ir = retrieval_hits(images, texts, text_to_image, ks=ks)
    assert ir.all()  # k >= N
    assert tr[2].all()  # k >= M
    expected_tr, expected_ir = topk_reference_hits(images, texts, text_to_image, ks=ks)
    assert torch.equal(tr, expected_tr) and torch.equal(ir, expected_ir)


@pytest.mark.parametrize(
    ("images", "texts", "text_to_image"),
    [
        (torch.randn(3, 4), torch.randn(2, 5), torch.tensor([0, 1])),  # widths differ
        (torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 3])),  # image index out of range
        (torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0.0, 1.0])),  # not integer
        (torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1, 2])),  # one index per caption
        (torch.full((3, 4), math.nan), torch.randn(2, 4), torch.tensor([0, 1])),  # NaN
        (torch.full((3, 4), 1e20), torch.full((2, 4), 1e20), torch.tensor([0, 1])),  # scores overflow to inf
    ],
)
def test_rejects_bad_inputs(images, texts, text_to_image):
    with pytest.raises(ValueError):
        retrieval_metrics(images, texts, text_to_image)


# ----------------------------------------------------------------------------------------------------------------------
# Chance level


def test_chance_by_hand():
    # 2 images, 3 captions (two for image 0). TR@1: image 0 hits w.p. 2/3, image 1 w.p. 1/3; k >= 3 retrieves all.
    assert_metrics(
        chance_retrieval_metrics(torch.tensor([0, 0, 1]), num_images=2),
        {"TR@1": 50.0, "TR@5": 100.0, "TR@10": 100.0, "IR@1": 50.0, "IR@5": 100.0, "IR@10": 100.0},
    )
    # An image without captions never hits.
    assert chance_retrieval_metrics(torch.tensor([0, 0, 1]), num_images=3)["TR@1"] == pytest.approx(100 / 3)


def test_chance_coco_sized():
    # 5,000 images x 5 captions: P(miss) = prod_{i<k} (M - 5 - i) / (M - i), written independently of math.comb.
    m = 25_000
    metrics = chance_retrieval_metrics(torch.arange(5000).repeat_interleave(5), num_images=5000)
    for k in KS:
        assert metrics[f"TR@{k}"] == pytest.approx(100 * (1 - math.prod((m - 5 - i) / (m - i) for i in range(k))))
        assert metrics[f"IR@{k}"] == pytest.approx(100 * k / 5000)
    assert metrics["TR@1"] == pytest.approx(0.02)


def test_chance_matches_monte_carlo():
    # I.i.d. Gaussian embeddings rank every query's candidates uniformly at random, so retrieval_metrics averages to
    # the chance level. 200 draws of 20 images; the bound is 5 standard errors of the mean.
    n_images, draws = 20, 200
    g = torch.Generator().manual_seed(7)
    text_to_image = torch.repeat_interleave(torch.arange(n_images), torch.randint(1, 6, (n_images,), generator=g))
    runs = [
        retrieval_metrics(
            torch.randn(n_images, 8, generator=g), torch.randn(len(text_to_image), 8, generator=g), text_to_image
        )
        for _ in range(draws)
    ]
    expected = chance_retrieval_metrics(text_to_image, n_images)
    for key in KEYS:
        samples = torch.tensor([run[key] for run in runs], dtype=torch.float64)
        stderr = samples.std().item() / math.sqrt(draws)
        assert abs(samples.mean().item() - expected[key]) <= 5 * stderr + 1e-9, (key, samples.mean(), expected[key])

"""Tests of evlp.eval.captions: retrieval against the distinct captions, the unique-caption subset and their chance
levels, on hand-built score tables, a brute-force reference, the per-caption protocol where captions never repeat,
and an open_clip model behind the evlp interface."""

from __future__ import annotations

import itertools
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from evlp.eval import OpenClipAdapter, caption_retrieval_metrics, evaluate_caption_retrieval, retrieval_metrics
from evlp.eval.captions import RECALL_KEYS, UNIQUE_KEYS, distinct_pairs, positive_ranks

KS = (1, 5, 10)


def unit(rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_repeated_caption_is_one_candidate_with_all_its_images_as_positives():
    # Images 0 and 1 are both "a dog" (written three times), image 2 is "a cat". Image 1's own embedding is far from
    # "a dog", but "a dog" counts as retrieved for image 1's TR as soon as it ranks first among the 2 distinct
    # captions, and the IR query "a dog" hits at 1 if either dog image is the best.
    images = unit([[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    texts = unit([[1, 0.1, 0], [1, 0.1, 0], [0, 1, 0], [1, 0.1, 0]])
    text_to_image = torch.tensor([0, 1, 2, 1])
    captions = ["a dog", "a  dog ", "a cat", "a dog"]  # whitespace differences are the same caption
    result = caption_retrieval_metrics(images, texts, text_to_image, captions)
    assert result.counts == {"images": 3, "caption_rows": 4, "captions": 2, "unique_captions": 1,
                             "unique_caption_images": 1}
    # image 1 scores 0 with both captions: an exact tie with the negative "a cat" counts against it
    assert result.metrics["TR@1"] == pytest.approx(200 / 3)
    assert result.metrics["TR@5"] == 100.0
    assert result.metrics["IR@1"] == 100.0
    assert result.metrics["unique_TR@1"] == 100.0 and result.metrics["unique_IR@1"] == 100.0
    # chance: TR@1 = 1/2 per image; IR@1 = 2/3 for "a dog" (2 of 3 images), 1/3 for "a cat"
    assert result.chance["TR@1"] == pytest.approx(50.0)
    assert result.chance["IR@1"] == pytest.approx(50.0)
    assert result.chance["unique_IR@1"] == pytest.approx(100 / 3)
    assert result.chance["unique_TR@1"] == pytest.approx(50.0)
    assert result.metrics["mean_recall"] == pytest.approx(sum(result.metrics[k] for k in RECALL_KEYS) / 6)
    assert result.metrics["unique_mean_recall"] == pytest.approx(sum(result.metrics[k] for k in UNIQUE_KEYS) / 6)


def test_ties_never_count_as_hits():
    # Two images with identical embeddings, each with its own caption: for each query its best positive ties with
    # one negative, so nothing is a hit at 1 and everything is at 5.
    images = unit([[1, 0], [1, 0]])
    texts = unit([[1, 0], [1, 0]])
    result = caption_retrieval_metrics(images, texts, torch.tensor([0, 1]), ["left", "right"])
    assert result.metrics["TR@1"] == 0 and result.metrics["IR@1"] == 0
    assert result.metrics["TR@5"] == 100 and result.metrics["IR@5"] == 100


def test_duplicated_rows_change_nothing():
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    texts = F.normalize(images + torch.randn(12, 8, generator=g), dim=-1)
    captions = [f"caption {i}" for i in range(12)]
    once = caption_retrieval_metrics(images, texts, torch.arange(12), captions)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 3, 7])  # three rows repeated, same image
    twice = caption_retrieval_metrics(images, texts[rows], rows, [captions[i] for i in rows])
    assert twice.metrics == once.metrics and twice.chance == once.chance
    assert twice.counts["captions"] == 12 and twice.counts["caption_rows"] == 15


@pytest.mark.parametrize("seed", range(3))
def test_equals_the_per_caption_protocol_when_no_caption_repeats(seed):
    g = torch.Generator().manual_seed(seed)
    n_images = 30
    images = F.normalize(torch.randn(n_images, 16, generator=g), dim=-1)
    text_to_image = torch.repeat_interleave(torch.arange(n_images), torch.randint(1, 4, (n_images,), generator=g))
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=g)]
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(len(text_to_image), 16, generator=g), dim=-1)
    result = caption_retrieval_metrics(images, texts, text_to_image, [f"t{j}" for j in range(len(texts))])
    expected = retrieval_metrics(images, texts, text_to_image)
    assert {k: result.metrics[k] for k in RECALL_KEYS} == pytest.approx(expected)
    # every caption is unique, so every query is in the unique subset
    assert {k: result.metrics[f"unique_{k}"] for k in RECALL_KEYS} == pytest.approx(expected)


def brute_force(images, texts, text_to_image, captions):
    """Sets and loops: distinct texts, positives as sets, rank = negatives scoring >= the best positive."""
    distinct = list(dict.fromkeys(" ".join(c.split()) for c in captions))
    first = {c: texts[[" ".join(x.split()) for x in captions].index(c)] for c in distinct}
    caption_images = {c: {int(i) for i, x in zip(text_to_image, captions) if " ".join(x.split()) == c}
                      for c in distinct}
    image_captions = {i: {c for c in distinct if i in caption_images[c]} for i in range(len(images))}

    def rank(score, positives, candidates):
        best = max(score(p) for p in positives)
        return sum(1 for c in candidates if c not in positives and score(c) >= best)

    tr = {i: rank(lambda c: float(images[i] @ first[c]), image_captions[i], distinct) for i in range(len(images))}
    ir = {c: rank(lambda i: float(images[i] @ first[c]), caption_images[c], range(len(images))) for c in distinct}
    unique_captions = {c for c in distinct if len(caption_images[c]) == 1}
    unique_images = {i for i in range(len(images)) if image_captions[i] <= unique_captions}
    out = {}
    for prefix, tr_q, ir_q in [("", list(tr), distinct), ("unique_", sorted(unique_images), sorted(unique_captions))]:
        for k in KS:
            out[f"{prefix}TR@{k}"] = 100 * sum(tr[i] < k for i in tr_q) / len(tr_q)
            out[f"{prefix}IR@{k}"] = 100 * sum(ir[c] < k for c in ir_q) / len(ir_q)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_a_brute_force_reference_with_repeats_and_ties(seed):
    """Integer-valued embeddings (exact ties everywhere), captions drawn from a small vocabulary (many repeats)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(-1, 2, (25, 3), generator=g).float()
    text_to_image = torch.repeat_interleave(torch.arange(25), torch.randint(1, 4, (25,), generator=g))
    words = torch.randint(0, 80, (len(text_to_image),), generator=g).tolist()
    captions = [f"word {w}" for w in words]
    texts = torch.stack([torch.tensor([(w % 3) - 1, (w // 3 % 3) - 1, (w // 9 % 3) - 1]).float() for w in words])
    result = caption_retrieval_metrics(images, texts, text_to_image, captions)
    assert result.counts["captions"] < len(captions) and result.counts["unique_caption_images"] > 0
    expected = brute_force(images, texts, text_to_image, captions)
    assert {k: result.metrics[k] for k in expected} == pytest.approx(expected)


def test_ranks_do_not_depend_on_the_block_size():
    g = torch.Generator().manual_seed(3)
    queries, candidates = torch.randn(37, 5, generator=g), torch.randn(23, 5, generator=g)
    pair_query = torch.randint(0, 37, (60,), generator=g)
    pair_candidate = torch.randint(0, 23, (60,), generator=g)
    whole = positive_ranks(queries, candidates, pair_query, pair_candidate)
    for block in (1, 23, 50, 230):
        assert torch.equal(positive_ranks(queries, candidates, pair_query, pair_candidate, max_block=block), whole)
    without = sorted(set(range(37)) - set(pair_query.tolist()))
    assert without and (whole[without] == 23).all()  # a query without positive never hits


def test_chance_levels_match_a_random_ranking():
    """Exact expectation over every ordering of the candidates of a small set."""
    text_to_image = torch.tensor([0, 1, 1, 2, 3])
    captions = ["a", "a", "b", "c", "c"]  # a: images 0, 1; b: image 1; c: images 2, 3
    pairs = distinct_pairs(text_to_image, captions, 4)
    result = caption_retrieval_metrics(torch.eye(4), torch.eye(4)[text_to_image], text_to_image, captions)
    image_positives = [{0}, {0, 1}, {2}, {2}]  # the distinct captions of each image
    caption_positives = pairs.positives_of_captions()

    def expected(positives: list[set], num_candidates: int, k: int) -> float:
        orders = list(itertools.permutations(range(num_candidates)))
        return 100 * sum(sum(bool(set(order[:k]) & p) for order in orders) / len(orders)
                         for p in positives) / len(positives)

    for k in KS:
        assert result.chance[f"TR@{k}"] == pytest.approx(expected(image_positives, 3, k))
        assert result.chance[f"IR@{k}"] == pytest.approx(expected([set(p) for p in caption_positives], 4, k))
    assert result.counts["unique_captions"] == 1  # b
    assert result.counts["unique_caption_images"] == 0  # image 1 also has "a"
    assert result.metrics["unique_TR@1"] is None and result.metrics["unique_mean_recall"] is None
    assert result.chance["unique_IR@1"] == pytest.approx(25.0)


def test_open_clip_model_behind_the_evlp_interface():
    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
                 text_cfg=CLIPTextCfg(context_length=12, vocab_size=49408, width=32, heads=2, layers=1))
    adapter = OpenClipAdapter(model, open_clip.get_tokenizer("ViT-B-32", context_length=12))
    captions = ["a red square", "a blue circle", "a red square", "two green dots", "a blue circle", "one star"]
    image_ids = [10, 11, 12, 13, 14, 15]
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = [{"image": images[s], "image_id": torch.tensor(image_ids)[s], "meta": [{}] * 3,
                "caption": captions[s], "text": None, "padding_mask": None} for s in (slice(0, 3), slice(3, 6))]
    result, emb = evaluate_caption_retrieval(adapter, batches, tokenize=adapter.tokenize, progress=False)
    assert result.counts["captions"] == 4 and result.counts["unique_captions"] == 2
    with torch.no_grad():
        expected_text = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=12)(
            captions)), dim=-1)
        expected_image = F.normalize(model.encode_image(images), dim=-1)
    torch.testing.assert_close(emb.text_embeddings, expected_text)
    torch.testing.assert_close(emb.image_embeddings, expected_image)
    token_ids, padding_mask = adapter.tokenize(["a dog"])
    assert padding_mask.tolist()[0] == [False] * 4 + [True] * 8  # <start> a dog <end>, then padding
    assert math.isfinite(result.metrics["unique_mean_recall"])


def test_batches_without_caption_strings_are_refused():
    batch = {"image": torch.rand(2, 3, 4, 4), "image_id": torch.tensor([0, 1]), "meta": [{}, {}],
             "text": torch.ones(2, 3, dtype=torch.long), "padding_mask": torch.zeros(2, 3, dtype=torch.bool)}

    class Model(torch.nn.Module):
        def encode_image(self, images):
            return F.normalize(images.flatten(1)[:, :4], dim=-1)

        def encode_text(self, token_ids, padding_mask):
            return F.normalize(token_ids[:, :1].float().expand(-1, 4), dim=-1)

    with pytest.raises(ValueError, match="caption strings"):
        evaluate_caption_retrieval(Model(), [batch], progress=False)

"""ImageTextShards: equal per-rank epochs, ranks slicing the one-process batches, determinism, exact resume, evaluation
order, bad samples."""

import io
import json
import logging
import random
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from webdataset.tariterators import tarfile_samples

import evlp.data.shards as shards
from evlp.data.shards import ImageTextShards, count_samples, make_loader, tar_samples
from evlp.data.synthetic import generate_sample, prepare_quickstart
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.data.transforms import IMAGENET_STD, eval_transform, normalize_images, to_rgb, train_transform
from evlp.errors import EvlpError

B = 8
SHARD = 40  # 5 train shards of 40: image_id // SHARD is the shard index


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_quickstart(tmp_path_factory.mktemp("qs"), num_train=200, num_val=50, image_size=32, shard_size=SHARD)


@pytest.fixture(scope="module")
def tokenizer(data):
    return TextTokenizer(load_tokenizer(data.vocab_dir), max_len=24)


def pixels(image: Image.Image) -> torch.Tensor:
    """A cheap transform for the tests that only look at which samples arrive."""
    return torch.from_numpy(np.asarray(to_rgb(image)).copy()).permute(2, 0, 1).float()


def epoch(ds, num_workers, epoch=0, start_batch=0, rank=0, world_size=1):
    ds.configure(epoch, start_batch=start_batch, rank=rank, world_size=world_size)
    return list(make_loader(ds, num_workers))


def ids(batches):
    return [i for b in batches for i in b["image_id"].tolist()]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and x["caption"] == y["caption"] and x["meta"] == y["meta"]
        for key in ("image", "text", "padding_mask", "image_id"):
            assert torch.equal(x[key], y[key]), key


def test_batch_layout(data, tokenizer):
    ds = ImageTextShards(data.train_urls, tokenizer, train_transform(32, hflip=0), B, train=True, shuffle_buffer=16)
    batch = epoch(ds, 0)[0]
    assert batch.keys() == {"image", "text", "padding_mask", "image_id", "meta", "caption"}
    assert batch["image"].shape == (B, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == batch["padding_mask"].shape == (B, 24)
    assert batch["text"].dtype == torch.long and batch["padding_mask"].dtype == torch.bool
    assert batch["image_id"].dtype == torch.long and len(batch["caption"]) == len(batch["meta"]) == B
    for i, meta, caption in zip(batch["image_id"].tolist(), batch["meta"], batch["caption"]):
        assert meta["image_id"] == i and generate_sample(i, image_size=32).caption == caption


def assert_ranks_slice(per_rank: list[list[dict]], whole: list[dict]) -> None:
    """Batch b of every rank, concatenated in rank order, is batch b of one process with the whole global batch."""
    assert all(len(batches) == len(whole) for batches in per_rank)
    for b, one in enumerate(whole):
        parts = [batches[b] for batches in per_rank]
        assert sum((p["caption"] for p in parts), []) == one["caption"]
        for key in ("image", "text", "padding_mask", "image_id"):
            assert torch.equal(torch.cat([p[key] for p in parts]), one[key]), key


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_equal_epochs_that_slice_the_one_process_batches(data, tokenizer, world_size, num_workers):
    transform = train_transform(32, hflip=0.5)  # the augmentations must agree too
    ds = ImageTextShards(data.train_urls, tokenizer, transform, B, train=True, shuffle_buffer=16)
    expected = 200 // (B * world_size)
    per_rank = []
    for rank in range(world_size):
        batches = epoch(ds, num_workers, epoch=2, rank=rank, world_size=world_size)
        assert len(batches) == len(ds) == expected
        assert all(len(b["caption"]) == B for b in batches)
        per_rank.append(batches)
    whole = ImageTextShards(data.train_urls, tokenizer, transform, B * world_size, train=True, shuffle_buffer=16)
    assert_ranks_slice(per_rank, epoch(whole, num_workers, epoch=2))


def test_workers_split_by_shard_when_there_are_enough(data, tokenizer):
    ds = ImageTextShards(data.train_urls, tokenizer, pixels, B, train=True, shuffle_buffer=16)
    batches = epoch(ds, 2)
    shards = [{i // SHARD for i in ids(batches[w::2])} for w in range(2)]  # batch b comes from worker b % 2
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 5
    # Worker 0 reads 3 shards (120 samples) for 13 batches; worker 1 reads 2 (80) for 12 and wraps around.
    assert len(set(ids(batches[0::2]))) == 13 * B and len(set(ids(batches[1::2]))) == 80


def test_workers_split_by_sample_when_shards_are_fewer(data, tokenizer):
    ds = ImageTextShards(data.train_urls[:1], tokenizer, pixels, B, train=True, shuffle_buffer=16)  # 40 samples
    batches = epoch(ds, 2)
    assert len(batches) == 5
    # One shard for two workers: worker 0 reads its even samples, worker 1 its odd ones (batch b from worker b % 2).
    assert {i % 2 for i in ids(batches[0::2])} == {0} and {i % 2 for i in ids(batches[1::2])} == {1}
    assert len(set(ids(batches[0::2]))) == 3 * B - 4  # 20 even samples for 3 batches: a second pass tops it up


def test_deterministic_and_epochs_differ(data, tokenizer):
    ds = ImageTextShards(data.train_urls, tokenizer, train_transform(32, hflip=0), B, train=True, shuffle_buffer=16)
    first, again, other = epoch(ds, 0, epoch=1), epoch(ds, 0, epoch=1), epoch(ds, 0, epoch=2)
    assert_same(first, again)
    assert ids(first) != ids(other)
    assert sorted(ids(first)) == list(range(200))  # one worker, 200 = 25 * 8: every sample exactly once
    # The same sample is augmented differently in another epoch.
    where = {i: (b, k) for b, batch in enumerate(other) for k, i in enumerate(batch["image_id"].tolist())}
    b, k = where[first[0]["image_id"][0].item()]
    assert not torch.equal(first[0]["image"][0], other[b]["image"][k])
    ds2 = ImageTextShards(data.train_urls, tokenizer, train_transform(32, hflip=0), B, train=True, shuffle_buffer=16,
                          seed=1)  # fmt: skip
    assert ids(epoch(ds2, 0, epoch=1)) != ids(first)


def test_iteration_leaves_the_callers_rng_alone(data, tokenizer):
    ds = ImageTextShards(data.train_urls, tokenizer, train_transform(32), B, train=True, shuffle_buffer=16)
    ds.configure(0)
    torch.manual_seed(0)
    random.seed(0)
    next(iter(ds))
    after = torch.rand(3), random.random()
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()


class CountingTransform:
    def __init__(self, transform):
        self.transform, self.calls = transform, 0

    def __call__(self, image):
        self.calls += 1
        return self.transform(image)


@pytest.mark.parametrize("num_workers,world_size,rank", [(0, 1, 0), (2, 1, 0), (2, 2, 1)])
def test_resume_reproduces_the_rest_of_the_epoch(data, tokenizer, num_workers, world_size, rank):
    transform = CountingTransform(train_transform(32, hflip=0.5))
    ds = ImageTextShards(data.train_urls, tokenizer, transform, B, train=True, shuffle_buffer=32)
    full = epoch(ds, num_workers, epoch=3, rank=rank, world_size=world_size)
    for s in (3, 6):
        transform.calls = 0
        resumed = epoch(ds, num_workers, epoch=3, start_batch=s, rank=rank, world_size=world_size)
        assert_same(resumed, full[s:])
        if num_workers == 0:  # skipped batches are never decoded or augmented
            assert transform.calls == (len(full) - s) * B
    assert epoch(ds, num_workers, epoch=3, start_batch=len(full), rank=rank, world_size=world_size) == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_yields_every_sample_once_in_order(data, tokenizer, num_workers):
    ds = ImageTextShards(data.val_urls, tokenizer, eval_transform(32), B, train=False)
    batches = epoch(ds, num_workers)
    assert len(ds) == len(batches) == 7
    assert [len(b["caption"]) for b in batches] == [B] * 6 + [2]  # last partial batch kept
    assert ids(batches) == list(range(50))
    assert_same(epoch(ds, 0, epoch=5), batches)  # no randomness
    assert ids(epoch(ds, num_workers, start_batch=4)) == list(range(32, 50))


def test_count_samples(data, tmp_path):
    assert count_samples(data.train_urls) == 200
    root = str(data.root / "val")
    assert count_samples(root + "/{000000..000001}.tar") == 50 and count_samples(root) == 50
    with pytest.raises(EvlpError, match="not found"):
        count_samples(root + "/{000000..000002}.tar")
    # Without stats.json the tar members are counted.
    shard = tmp_path / "000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for k in range(7):
            sink.write({"__key__": f"{k:04d}", "png": b"x", "txt": b"y"})
    assert count_samples([str(shard)]) == 7
    with pytest.raises(EvlpError):
        count_samples("pipe:cat /nowhere.tar")


def test_too_little_data_and_bad_resume_point(data, tokenizer):
    ds = ImageTextShards(data.val_urls, tokenizer, pixels, 32, train=True)
    with pytest.raises(EvlpError, match="one batch"):
        ds.configure(0, world_size=2)
    ds.configure(0)
    with pytest.raises(ValueError):
        ds.configure(0, start_batch=len(ds) + 1)


def _png(i):
    buffer = io.BytesIO()
    generate_sample(i, image_size=32).image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def damaged(tmp_path):
    """Two shards of 20; the first has 6 bad samples: 3 non-images, a truncated PNG, a missing and an empty caption."""
    urls = []
    for s in range(2):
        url = str(tmp_path / f"{s:06d}.tar")
        with wds.TarWriter(url, encoder=False) as sink:
            for k in range(20):
                i = s * 20 + k
                sample = {"__key__": f"{i:06d}", "png": _png(i), "txt": f"caption {i}".encode(),
                          "json": json.dumps({"image_id": i}).encode()}  # fmt: skip
                if s == 0 and k in (1, 2, 3):
                    sample["png"] = b"not an image"
                elif s == 0 and k == 5:
                    sample["png"] = sample["png"][: len(sample["png"]) // 2]
                elif s == 0 and k == 8:
                    del sample["txt"]
                elif s == 0 and k == 13:
                    sample["txt"] = b"  "
                sink.write(sample)
        urls.append(url)
    return urls


def test_bad_samples_are_skipped_and_counted(damaged, tokenizer, caplog):
    bad = {1, 2, 3, 5, 8, 13}
    ds = ImageTextShards(damaged, tokenizer, eval_transform(32), 4, train=False)
    with caplog.at_level(logging.WARNING, logger="evlp.data.shards"):
        batches = epoch(ds, 0)
    assert ids(batches) == [i for i in range(40) if i not in bad]
    assert ds.num_bad == len(bad)
    warned = [r.getMessage() for r in caplog.records if "max_bad_fraction" in r.getMessage()]
    assert len(warned) == 1 and damaged[0] in warned[0]

    train = ImageTextShards(damaged, tokenizer, train_transform(32), 4, train=True, shuffle_buffer=8)
    batches = epoch(train, 0)
    assert len(batches) == len(train) == 10 and all(b["image"].shape[0] == 4 for b in batches)
    assert not set(ids(batches)) & bad and train.num_bad >= len(bad)


def test_damaged_tar_and_undecodable_data(damaged, tokenizer, caplog):
    with open(damaged[1], "r+b") as f:  # cut the second shard in the middle of a member
        f.truncate(f.seek(0, 2) // 2 + 100)
    ds = ImageTextShards(damaged, tokenizer, eval_transform(32), 4, train=False, num_samples=40)
    with caplog.at_level(logging.WARNING, logger="evlp.data.shards"):
        seen = ids(epoch(ds, 0))
    assert seen[:14] == [i for i in range(20) if i not in {1, 2, 3, 5, 8, 13}] and 20 < len(seen) < 40

    def truncated(image):
        raise OSError("image file is truncated")

    train = ImageTextShards(damaged[:1], tokenizer, truncated, 4, train=True, num_samples=20)
    with pytest.raises(EvlpError, match="without a decodable image"):
        epoch(train, 0)


# -- weighted mixtures of sources ---------------------------------------------------------------------------------

OTHER = 1000  # image ids of the second source start here


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second source: 60 pairs (ids 1000..1059) in 3 shards of 20, with stats.json."""
    folder = tmp_path_factory.mktemp("other")
    counts = {}
    for s in range(3):
        name = f"{s:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as sink:
            for i in range(OTHER + 20 * s, OTHER + 20 * (s + 1)):
                sink.write({"__key__": f"{i:06d}", "png": _png(i), "txt": f"caption {i}".encode(),
                            "json": json.dumps({"image_id": i}).encode()})  # fmt: skip
        counts[name] = 20
    (folder / "stats.json").write_text(json.dumps({"num_samples": 60, "shards": counts}))
    return str(folder)


def mixture(data, other, tokenizer, weights, transform=pixels, batch_size=B, **kw):
    return ImageTextShards([data.train_urls, other], tokenizer, transform, batch_size, train=True, shuffle_buffer=16,
                           weights=weights, **kw)


def test_mixture_draws_each_source_by_its_weight(data, other, tokenizer):
    ds = mixture(data, other, tokenizer, [1, 3])
    assert ds.num_samples == 260 and ds.source_sizes == [200, 60]
    batches = epoch(ds, 0, epoch=1)
    assert len(batches) == len(ds) == 260 // B and all(len(b["caption"]) == B for b in batches)
    drawn = ids(batches)
    share = sum(i >= OTHER for i in drawn) / len(drawn)
    assert 0.65 < share < 0.85  # 3/4 expected; binomial sd over 256 draws is 0.027
    assert set(i for i in drawn if i >= OTHER) == set(range(OTHER, OTHER + 60))  # upsampled: every pair, repeated
    # Sources are interleaved within batches, not one after the other.
    assert sum(0 < sum(i >= OTHER for i in b["image_id"].tolist()) < B for b in batches) > len(batches) // 2
    summary = ds.mixture_summary()
    assert len(summary) == 2 and "75.0% of the draws" in summary[1] and "passes per epoch" in summary[1]
    # A weight of zero: that source is never read and does not lengthen the epoch.
    only_first = mixture(data, other, tokenizer, [2, 0])
    assert only_first.num_samples == 200 and len(only_first) == 25
    assert sorted(ids(epoch(only_first, 0))) == list(range(200))


def test_mixture_is_deterministic_and_epochs_differ(data, other, tokenizer):
    ds = mixture(data, other, tokenizer, [1, 1], transform=train_transform(32, hflip=0))
    first, again, other_epoch = epoch(ds, 0, epoch=1), epoch(ds, 0, epoch=1), epoch(ds, 0, epoch=2)
    assert_same(first, again)
    assert ids(first) != ids(other_epoch)


@pytest.mark.parametrize("weights", [[1, 3], None])  # None: in proportion to the sizes, every pair once per pass
@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (2, 1), (2, 2)])
def test_mixture_ranks_are_equal_slices_and_resume_exactly(data, other, tokenizer, num_workers, world_size,
                                                          weights):
    # 2 worker slots: each source (5 and 3 shards) is split by shard.
    transform = CountingTransform(train_transform(32, hflip=0.5))
    ds = mixture(data, other, tokenizer, weights, transform=transform)
    per_rank = []
    for rank in range(world_size):
        full = epoch(ds, num_workers, epoch=3, rank=rank, world_size=world_size)
        assert len(full) == len(ds) == 260 // (B * world_size)
        per_rank.append(full)
        for s in (3, 5):
            transform.calls = 0
            resumed = epoch(ds, num_workers, epoch=3, start_batch=s, rank=rank, world_size=world_size)
            assert_same(resumed, full[s:])
            if num_workers == 0:
                assert transform.calls == (len(full) - s) * B  # skipped batches are never decoded
    whole = mixture(data, other, tokenizer, weights, transform=transform, batch_size=B * world_size)
    assert_ranks_slice(per_rank, epoch(whole, num_workers, epoch=3))


# -- how batches mix: sources pair by pair, several shards at once -----------------------------------------------

MIX_SIZES = (150, 900, 3750)  # three sources of very different sizes, in shards of 50: 3, 18 and 75 shards
MIX_SHARD = 50
MB = 32  # 4800 pairs = 150 batches of 32


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Tiny PNGs in three folders with stats.json; image_id = 100000 * source + 1000 * shard + index."""
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (90, 120, 30)).save(png, format="PNG")
    folders = []
    for k, size in enumerate(MIX_SIZES):
        folder = tmp_path_factory.mktemp(f"source{k}")
        counts = {}
        for s in range(size // MIX_SHARD):
            name = f"{s:06d}.tar"
            with wds.TarWriter(str(folder / name), encoder=False) as sink:
                for j in range(MIX_SHARD):
                    i = 100000 * k + 1000 * s + j
                    sink.write({"__key__": f"{i:09d}", "png": png.getvalue(), "txt": b"a caption",
                                "json": json.dumps({"image_id": i}).encode()})
            counts[name] = MIX_SHARD
        (folder / "stats.json").write_text(json.dumps({"num_samples": size, "shards": counts}))
        folders.append([str(folder)])
    return folders  # a list of sources (each a list): mixed pair by pair in proportion to their sizes


def composition(batches):
    """Per batch: the share of each source, and the number of shards it came from."""
    shares, shards = [], []
    for b in batches:
        batch_ids = b["image_id"].tolist()
        shares.append([sum(i // 100000 == k for i in batch_ids) / len(batch_ids) for k in range(len(MIX_SIZES))])
        shards.append(len({i // 1000 for i in batch_ids}))
    return np.array(shares), np.array(shards)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_mix_sources_as_iid_sampling_would(three_sources, tokenizer, num_workers):
    """Each batch's share of a source spreads as around its size share as i.i.d. draws would: the standard deviation
    over batches within 1.5x of the binomial one, sqrt(p (1 - p) / B), for each of three sources of 3 %, 19 % and
    78 % of the pairs (a source read shard after shard spreads many times more)."""
    ds = ImageTextShards(three_sources, tokenizer, pixels, MB, train=True, shuffle_buffer=64)
    assert ds.source_sizes == list(MIX_SIZES) and len(ds) == 150
    batches = epoch(ds, num_workers, epoch=1)
    shares, _ = composition(batches)
    for k, size in enumerate(MIX_SIZES):
        p = size / sum(MIX_SIZES)
        binomial = (p * (1 - p) / MB) ** 0.5
        assert abs(shares[:, k].mean() - p) < 0.01, k
        assert binomial / 1.5 < shares[:, k].std() < 1.5 * binomial, (k, shares[:, k].std(), binomial)
    if num_workers == 0:  # one slot, 150 x 32 = 4800: every pair exactly once in the epoch
        assert sorted(ids(batches)) == sorted(100000 * k + 1000 * s + j for k, size in enumerate(MIX_SIZES)
                                              for s in range(size // MIX_SHARD) for j in range(MIX_SHARD))


def test_slots_share_out_the_samples_of_too_few_shards():
    """With fewer shards than slots, slot s keeps sample j of the i-th shard when (i + j) % slots == s: every sample
    goes to one slot, and the counts the mixture draws by are those samples."""
    counts, num_slots = [5, 3, 7], 4
    kept = {}
    for slot in range(num_slots):
        mine = [(i, j) for i, n in enumerate(counts) for j in range(n) if (i + j) % num_slots == slot]
        assert shards._kept_count(counts, (slot, num_slots)) == len(mine)
        for i, n in enumerate(counts):
            first, step = shards._kept(i, (slot, num_slots))
            assert [(i, j) for j in range(first, n, step)] == [x for x in mine if x[0] == i]
        kept[slot] = set(mine)
    assert sorted(x for slot in kept.values() for x in slot) == [(i, j) for i, n in enumerate(counts) for j in range(n)]


def test_each_worker_reads_several_shards_at_once(three_sources, tokenizer):
    """With open_shards shards read at once, a batch comes from many shards; one at a time, from a handful."""
    spread = {}
    for width in (1, 32):
        ds = ImageTextShards(three_sources, tokenizer, pixels, MB, train=True, shuffle_buffer=64, open_shards=width)
        _, per_batch = composition(epoch(ds, 0))
        spread[width] = per_batch.mean()
    assert spread[1] < 8 and spread[32] > 2 * spread[1], spread


@pytest.mark.parametrize("weights,message", [
    ([1], "1 entry for 2 data sources"),
    ([1, -1], "non-negative"),
    ([1, float("nan")], "non-negative"),
    ([0, 0], "all zero"),
    (["a", 1], "must be numbers"),
])
def test_bad_mixture_weights(data, other, tokenizer, weights, message):
    with pytest.raises(EvlpError, match=message) as raised:
        mixture(data, other, tokenizer, weights)
    assert "\n" not in str(raised.value)


# -- the fast paths: uint8 batches, the tar reader ----------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uint8_batches_normalise_to_the_float_ones(data, tokenizer, num_workers):
    """TrainTransform(normalize=False) fills uint8 rows (in shared memory in workers); normalize_images finishes them
    to the float batch, up to rounding to 8-bit levels."""
    as_float = ImageTextShards(data.train_urls, tokenizer, train_transform(32), B, train=True, shuffle_buffer=16)
    as_uint8 = ImageTextShards(data.train_urls, tokenizer, train_transform(32, normalize=False), B, train=True,
                               shuffle_buffer=16)  # fmt: skip
    floats, uint8s = epoch(as_float, num_workers, epoch=1), epoch(as_uint8, num_workers, epoch=1)
    assert len(floats) == len(uint8s) == 25
    for f, u in zip(floats, uint8s):
        assert u["image"].dtype == torch.uint8 and u["image"].shape == f["image"].shape == (B, 3, 32, 32)
        assert torch.equal(u["image_id"], f["image_id"])
        assert (normalize_images(u["image"]) - f["image"]).abs().max() <= 0.5 / (255 * min(IMAGENET_STD)) + 1e-5


def _write_tar(path, fmt, members):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size, info.mtime = len(content), 1.5  # a float mtime makes tarfile write pax headers
            tar.addfile(info, io.BytesIO(content))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_groups_samples_as_webdataset_does(tmp_path, fmt):
    members = []
    for k in range(5):
        folder = "x" * 120 + "/" if k == 3 else "sub/"  # a long name: ustar prefix, GNU longname or pax path
        members += [(f"{folder}{k:04d}.JPG", bytes([k]) * (700 * k + 1)), (f"{folder}{k:04d}.txt", "ü".encode()),
                    (f"{folder}{k:04d}.json", b"{}")]  # fmt: skip
        if k == 1:
            members += [("sub/folder", None), ("__meta__", b"m"), ("sub/0001.txt", b"again"), ("README", b"x")]
    url = str(tmp_path / "shard.tar")
    _write_tar(url, fmt, members)
    ours = list(tar_samples(url))
    assert ours == list(tarfile_samples([dict(url=url)], handler=lambda e: True))
    assert [len(s) for s in ours] == [5] * 5 and ours[0]["jpg"] == b"\0"


def test_tar_reader_stops_at_damage_after_the_samples_before(data, tmp_path, caplog):
    original = open(data.train_urls[0], "rb").read()
    for cut in (512 * 3 + 100, len(original) // 2 + 100, len(original) // 2 + 7):  # in data, in data, in a header
        url = tmp_path / "cut.tar"
        url.write_bytes(original[:cut])
        with caplog.at_level(logging.WARNING, logger="evlp.data.shards"):
            ours = list(tar_samples(str(url)))
        assert ours == list(tarfile_samples([dict(url=str(url))], handler=lambda e: True))
        assert "cannot read on" in caplog.text
        caplog.clear()
    # A cut exactly between members looks like the end of the archive, to tarfile as well: no warning.
    url.write_bytes(original[: len(original) // 2])
    assert 0 < len(list(tar_samples(str(url)))) < 40 and not caplog.text
    url.write_bytes(b"corrupt" + original[7:])  # a header whose checksum does not match
    with caplog.at_level(logging.WARNING, logger="evlp.data.shards"):
        assert list(tar_samples(str(url))) == [] and "bad checksum" in caplog.text

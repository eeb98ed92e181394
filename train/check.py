"""``segface-jax data check``: find what is missing in a dataset folder before training starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from segface_jax.datasets import DATASETS
from segface_jax.train import data


@dataclasses.dataclass
class CheckReport:
    """Problems found in one split, grouped by kind: {kind: [file or sample names]}."""

    dataset: str
    split: str
    samples: int = 0
    problems: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, item: str) -> None:
        """Record one problem of ``kind`` (e.g. 'missing images')."""
        self.problems.setdefault(kind, []).append(item)

    def lines(self, show: int = 10) -> list[str]:
        """Human-readable summary: counts per kind and the first ``show`` names of each."""
        head = f"{self.dataset} {self.split}: {self.samples} samples"
        if not self.problems:
            return [head + ", no problems found"]
        out = [head + f", {sum(map(len, self.problems.values()))} problem(s)"]
        for kind, items in self.problems.items():
            more = f" (+{len(items) - show} more)" if len(items) > show else ""
            out.append(f"  {len(items)} {kind}: {', '.join(items[:show])}{more}")
        return out


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) read from an image file's header, without decoding its pixels; a
    ``DataError`` when it is not an image or a JPEG/PNG whose end marker is missing (a
    truncated copy or download)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size, kind = im.size, im.format
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise data.DataError(f"{path}: not a readable image ({e})") from None
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 16))
        tail = f.read()
    if (kind == "JPEG" and b"\xff\xd9" not in tail) or (kind == "PNG" and b"IEND" not in tail):
        raise data.DataError(f"{path}: truncated {kind} (its end marker is missing)")
    return size


def _check_sizes(report: CheckReport, image: Path | None, labels: list[Path],
                 kind: str = "labels whose size differs") -> None:
    """Headers of a sample's existing files: readable, complete, label sizes consistent (with
    the image too when ``image`` is given: CelebAMask-HQ's 512 px masks label 1024 px photos)."""
    sizes = {}
    for p in ([image] if image is not None else []) + labels:
        if p.is_file():
            try:
                sizes[p] = header_size(p)
            except data.DataError as e:
                report.add("unreadable or truncated files", str(e))
    found = [sizes[p] for p in labels if p in sizes]
    want = sizes.get(image) if image is not None else (found[0] if found else None)
    for p in labels:
        if p in sizes and want is not None and sizes[p] != want:
            report.add(kind, f"{p} {sizes[p]} vs {want}")


def check_split(dataset: str, root: str | Path, split: str, decode: bool = False) -> CheckReport:
    """Existence, headers (readable, complete, matching sizes) and with ``decode`` full
    decoding of every file ``split`` needs."""
    root = Path(root)
    report = CheckReport(dataset, split)
    try:
        source = data.open_source(dataset, root, split)
    except data.DataError as e:
        report.add("layout errors", str(e))
        return report
    report.samples = len(source)
    _LAYOUT_CHECKS[type(source)](report, source)
    if decode and not report.problems:
        for i in range(len(source)):
            try:
                source[i]
            except data.DataError as e:
                report.add("unreadable files", str(e))
    return report


def _check_celebamask_hq(report: CheckReport, source: data.CelebAMaskHQ) -> None:
    for name in source.names:
        if not source.image_path(name).is_file():
            report.add("missing images", str(source.image_path(name)))
        if not any(p.is_file() for p in source.mask_paths(name)):
            report.add("samples without any part mask", name)
        _check_sizes(report, None, [source.image_path(name)])  # its header only
        _check_sizes(report, None, source.mask_paths(name))


def _check_landmarks(report: CheckReport, source, name: str, path: Path) -> None:
    """A sample's landmark file: present, and read by ``source.points`` without error."""
    if not path.is_file():
        report.add("missing landmark files", str(path))
        return
    try:
        source.points(name)
    except data.DataError as e:
        report.add("bad landmark files", str(e))


def _check_lapa(report: CheckReport, source: data.LaPa) -> None:
    for name in source.names:
        image, label, landmarks = source.paths(name)
        if not label.is_file():
            report.add("missing labels", str(label))
        _check_sizes(report, image, [label])
        _check_landmarks(report, source, name, landmarks)
    labels = source.root / source.split / "labels"
    if labels.is_dir():
        names = set(source.names)
        for png in sorted(labels.glob("*.png")):
            if png.stem not in names:
                report.add("labels without an image", str(png))


def _check_helen(report: CheckReport, source: data.Helen) -> None:
    try:
        table = source.landmark_table()
    except data.DataError as e:
        report.add("layout errors", str(e))
        table = {}
    for name in source.names:
        image, label = source.paths(name)
        if not image.is_file():
            report.add("missing images", str(image))
        if not label.is_file():
            report.add("missing labels", str(label))
        _check_sizes(report, image, [label])
        if table and name not in table:
            report.add("samples missing from landmarks.txt", name)


def _check_folder(report: CheckReport, source: data.Folder) -> None:
    """The generic layout: pairs, sizes, mask values against classes.json, landmarks."""
    images = source.base / "images"
    stems: dict[str, list[str]] = {}
    for p in images.iterdir():
        if p.suffix.lower() in data.IMAGE_SUFFIXES:
            stems.setdefault(p.stem, []).append(p.name)
    for _, names in sorted(stems.items()):
        if len(names) > 1:
            report.add("images sharing a stem (one mask cannot label both)",
                       f"{images}/{{{','.join(sorted(names))}}}")
    for name in source.names:
        image, mask, landmarks = source.paths(name)
        if name not in source.images:
            report.add("listed but missing images", f"{image.parent / name}.*")
            continue
        if not mask.is_file():
            report.add("images without a mask", str(mask))
            continue
        before = len(report.problems.get("unreadable or truncated files", ()))
        _check_sizes(report, None, [image])  # readable and complete
        _check_sizes(report, None, [mask])
        if len(report.problems.get("unreadable or truncated files", ())) == before:
            want, got = data.upright_size(image), header_size(mask)
            if got != want:  # masks label the image as shown (EXIF orientation applied)
                report.add("masks whose size differs from the image", f"{mask} {got} vs {want}")
            try:
                source.label(name)  # masks are small: their values are always checked
            except data.DataError as e:
                kind = ("masks with values outside classes.json" if "not classes of" in str(e)
                        else "unreadable masks")
                report.add(kind, str(e))
        if source.data.aligns:
            _check_landmarks(report, source, name, landmarks)
    masks = source.base / "masks"
    if masks.is_dir():
        for png in sorted(masks.glob("*.png")):
            if png.stem not in source.images:
                report.add("masks without an image", str(png))


# each source layout's own file checks
_LAYOUT_CHECKS = {data.CelebAMaskHQ: _check_celebamask_hq, data.LaPa: _check_lapa,
                  data.Helen: _check_helen, data.Folder: _check_folder}


def run_check(args) -> int:
    """The ``data check`` command: exit status 1 when anything is missing."""
    if args.dataset not in data.SOURCES:
        raise data.DataError(f"unknown dataset {args.dataset!r}; choose from "
                             f"{', '.join(data.SOURCES)}")
    if args.split != "all":
        splits: tuple[str, ...] = (args.split,)
    elif args.dataset == "folder":
        try:
            splits = data.folder_dataset(args.root).splits
        except data.DataError as e:
            report = CheckReport(args.dataset, "all")
            report.add("layout errors", str(e))
            print("\n".join(report.lines()))
            print(f"{args.root}: fix the layout before training")
            return 1
    else:
        splits = DATASETS[args.dataset].splits
    reports = [check_split(args.dataset, args.root, s, args.decode) for s in splits]
    for r in reports:
        print("\n".join(r.lines()))
    bad = [r for r in reports if r.problems]
    if bad:
        print(f"{args.root}: {len(bad)} split(s) with problems; fix them before training")
        return 1
    print(f"{args.root}: {args.dataset} is complete"
          + ("" if args.decode else " (files exist, headers read; --decode also decodes "
                                    "every one)"))
    return 0

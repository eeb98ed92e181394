"""``segface-jax data check``: find what is missing in a dataset folder before training starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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


def check_split(dataset: str, root: str | Path, split: str, decode: bool = False) -> CheckReport:
    """Existence (and with ``decode``, readability) of every file ``split`` needs."""
    root = Path(root)
    report = CheckReport(dataset, split)
    try:
        source = data.open_source(dataset, root, split)
    except data.DataError as e:
        report.add("layout errors", str(e))
        return report
    report.samples = len(source)
    if dataset == "celebamask_hq":
        for name in source.names:
            if not source.image_path(name).is_file():
                report.add("missing images", str(source.image_path(name)))
            if not any(p.is_file() for p in source.mask_paths(name)):
                report.add("samples without any part mask", name)
    elif dataset == "lapa":
        for name in source.names:
            _, label, landmarks = source.paths(name)
            if not label.is_file():
                report.add("missing labels", str(label))
            if not landmarks.is_file():
                report.add("missing landmark files", str(landmarks))
            else:
                try:
                    source.points(name)
                except data.DataError as e:
                    report.add("bad landmark files", str(e))
        labels = root / split / "labels"
        if labels.is_dir():
            names = set(source.names)
            for png in sorted(labels.glob("*.png")):
                if png.stem not in names:
                    report.add("labels without an image", str(png))
    else:
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
            if table and name not in table:
                report.add("samples missing from landmarks.txt", name)
    if decode and not report.problems:
        for i in range(len(source)):
            try:
                source[i]
            except data.DataError as e:
                report.add("unreadable files", str(e))
    return report


def run_check(args) -> int:
    """The ``data check`` command: exit status 1 when anything is missing."""
    if args.dataset not in data.DATASETS:
        raise data.DataError(f"unknown dataset {args.dataset!r}")
    splits = data.SPLITS[args.dataset] if args.split == "all" else (args.split,)
    reports = [check_split(args.dataset, args.root, s, args.decode) for s in splits]
    for r in reports:
        print("\n".join(r.lines()))
    bad = [r for r in reports if r.problems]
    if bad:
        print(f"{args.root}: {len(bad)} split(s) with problems; fix them before training")
        return 1
    print(f"{args.root}: {args.dataset} is complete"
          + ("" if args.decode else " (files exist; --decode also opens every one)"))
    return 0

"""Label sets (what each class index means) and mappings between them, as data.

A ``LabelSet`` is a list of class names in the decoder's token order, with one colour per
class, the ignore value its masks may use, and the left/right pairs a mirror image swaps.
SegFace's three benchmark sets are built in (``LABEL_SETS``); a user's set is read from a
``classes.json``::

    {"name": "mine", "classes": ["background", "skin", "lips", "hair"],
     "colours": {"lips": [200, 0, 80]},        # optional: by name, or a list in class order
     "ignore_index": 255,                      # optional: mask value that is not a class
     "mirror": [["left_eye", "right_eye"]]}    # optional: pairs a horizontal flip swaps

A ``LabelMapping`` turns one set's indices into another's: rename, merge, or drop to the
ignore label. Its JSON file names the target set and says where each source class goes::

    {"to": ["background", "skin", "lips", "hair"],   # or a built-in set's name, e.g. "lapa"
     "map": {"face": "skin", "upperlip": "lips", "lowerlip": "lips", "neck": null}}

A source class the file does not list goes to the target class of the same name, or is
ignored when the target has none; ``null`` ignores it explicitly.

Index 0 is the background, as in SegFace's sets: the mean F1 leaves it out, and training's
random affine labels the pixels it brings in with 0.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IGNORE = 255  # the label value every loss and metric here skips

RGB = tuple[int, int, int]

# SegFace's class orders, from upstream's data loaders (the decoder's token order).
CELEBAMASK_HQ_CLASSES: tuple[str, ...] = (
    "background", "neck", "face", "cloth", "rightear", "leftear", "rightbro", "leftbro",
    "righteye", "lefteye", "nose", "innermouth", "lowerlip", "upperlip", "hair", "glass",
    "hat", "earring", "necklace",
)
# LaPa and Helen share one token order, which differs from CelebAMask-HQ's.
LAPA_CLASSES: tuple[str, ...] = (
    "background", "face", "leftbro", "rightbro", "lefteye", "righteye", "nose",
    "upperlip", "innermouth", "lowerlip", "hair",
)
HELEN_CLASSES: tuple[str, ...] = LAPA_CLASSES

# One RGB colour per class name, so a class looks the same whatever the label set.
COLOURS: dict[str, RGB] = {
    "background": (0, 0, 0),
    "neck": (255, 153, 51),
    "face": (204, 0, 0),
    "cloth": (0, 204, 0),
    "rightear": (102, 51, 0),
    "leftear": (153, 76, 0),
    "rightbro": (255, 204, 204),
    "leftbro": (255, 153, 204),
    "righteye": (51, 255, 255),
    "lefteye": (0, 153, 255),
    "nose": (76, 153, 0),
    "innermouth": (102, 204, 0),
    "lowerlip": (255, 255, 0),
    "upperlip": (0, 0, 153),
    "hair": (0, 0, 204),
    "glass": (204, 0, 204),
    "hat": (255, 51, 153),
    "earring": (0, 204, 204),
    "necklace": (0, 51, 0),
}

# Class names become parameter names (``<name>_token``) and file keys: keep them plain.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_SIDES = (("left", "right"), ("l_", "r_"))


class LabelError(ValueError):
    """A label set or mapping that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Class names in token order, their colours, the masks' ignore value and mirror pairs."""

    name: str
    classes: tuple[str, ...]
    colours: tuple[RGB, ...]
    mirror: tuple[tuple[str, str], ...] = ()  # (left, right) names a horizontal flip swaps
    ignore_index: int = IGNORE  # mask value that means "not labelled"

    @classmethod
    def of(cls, name: str, classes: Sequence[str],
           colours: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None = None,
           mirror: Sequence[Sequence[str]] | None = None,
           ignore_index: int = IGNORE) -> LabelSet:
        """A checked label set; colours default to the built-in ones by name (then to distinct
        generated ones), mirror pairs to names that differ only by a left/right prefix."""
        classes = tuple(classes)
        bad = [c for c in classes if not isinstance(c, str) or not _NAME.match(c)]
        if bad:
            raise LabelError(f"class names must be letters, digits and _ (starting with a "
                             f"letter): {bad}")
        if len(set(classes)) != len(classes):
            dup = sorted({c for c in classes if classes.count(c) > 1})
            raise LabelError(f"class names repeat: {dup}")
        if not 1 <= len(classes) <= 255:
            raise LabelError(f"a label set needs 1 to 255 classes, not {len(classes)}")
        if not 0 <= ignore_index <= 255 or ignore_index < len(classes):
            raise LabelError(f"ignore_index {ignore_index} must be a mask value (0..255) above "
                             f"the class indices 0..{len(classes) - 1}")
        rgb = _colours(classes, colours)
        pairs = _default_mirror(classes) if mirror is None else tuple(
            (str(a), str(b)) for a, b in mirror)
        for a, b in pairs:
            if a not in classes or b not in classes:
                raise LabelError(f"mirror pair ({a}, {b}) names a class not in {list(classes)}")
        return cls(name, classes, rgb, pairs, ignore_index)

    @property
    def palette(self) -> tuple[RGB, ...]:
        """One RGB colour per class, in class order."""
        return self.colours

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """The index of class ``name``."""
        return self.classes.index(name)

    @property
    def mirrored_classes(self) -> tuple[int, ...]:
        """For each class, the class it becomes in the mirror image (pairs swapped)."""
        swap = {a: b for a, b in self.mirror} | {b: a for a, b in self.mirror}
        return tuple(self.index(swap.get(c, c)) for c in self.classes)

    def to_json(self) -> dict[str, Any]:
        """The ``classes.json`` form of this set."""
        return {"name": self.name, "classes": list(self.classes),
                "colours": [list(c) for c in self.colours],
                "mirror": [list(p) for p in self.mirror], "ignore_index": self.ignore_index}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any], where: str = "label set") -> LabelSet:
        """A set from its ``classes.json`` form; ``LabelError`` naming ``where`` otherwise."""
        if not isinstance(spec, Mapping) or not isinstance(spec.get("classes"), list):
            raise LabelError(f"{where}: expected an object with \"classes\": [names in index "
                             "order]")
        try:
            return cls.of(str(spec.get("name", "custom")), spec["classes"], spec.get("colours"),
                          spec.get("mirror"), int(spec.get("ignore_index", IGNORE)))
        except (LabelError, TypeError, ValueError) as e:
            raise LabelError(f"{where}: {e}") from None


def _colours(classes: tuple[str, ...], given) -> tuple[RGB, ...]:
    if given is not None and not isinstance(given, Mapping):
        given = list(given)
        if len(given) != len(classes):
            raise LabelError(f"{len(given)} colours for {len(classes)} classes")
        given = dict(zip(classes, given, strict=True))
    given = dict(given or {})
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise LabelError(f"colours for classes not in the set: {unknown}")
    out = []
    for i, c in enumerate(classes):
        rgb = given.get(c, COLOURS.get(c))
        if rgb is None:  # distinct hues, far from the built-in colours' usual places
            r, g, b = colorsys.hsv_to_rgb((0.13 + 0.618034 * i) % 1.0, 0.65, 0.95)
            rgb = (round(255 * r), round(255 * g), round(255 * b))
        rgb = tuple(int(v) for v in rgb)
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise LabelError(f"colour of {c!r} must be three numbers 0..255, not {list(rgb)}")
        out.append(rgb)
    return tuple(out)


def _default_mirror(classes: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for c in classes:
        for left, right in _SIDES:
            if c.startswith(left) and right + c[len(left):] in classes:
                pairs.append((c, right + c[len(left):]))
    return tuple(pairs)


CELEBAMASK_HQ = LabelSet.of("celebamask_hq", CELEBAMASK_HQ_CLASSES)
LAPA = LabelSet.of("lapa", LAPA_CLASSES)
HELEN = LabelSet.of("helen", HELEN_CLASSES)
LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (CELEBAMASK_HQ, LAPA, HELEN)}


def read_label_set(path: str | os.PathLike) -> LabelSet:
    """The label set of a ``classes.json`` file."""
    path = Path(path)
    spec = _read_json(path, "no such file; a dataset in the generic layout needs a classes.json "
                            "(see segface_jax/labels.py)")
    return LabelSet.from_json(spec, str(path))


def _read_json(path: Path, missing: str) -> Any:
    """The JSON in ``path``; ``LabelError`` naming it (``missing``: what to say when absent)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LabelError(f"{path}: {missing}") from None
    except (OSError, ValueError) as e:
        raise LabelError(f"{path}: not readable JSON ({e})") from None


def get_label_set(spec: str | os.PathLike | Sequence[str]) -> LabelSet:
    """A built-in set by name, a ``classes.json`` path, or a list of class names."""
    if isinstance(spec, str) and spec in LABEL_SETS:
        return LABEL_SETS[spec]
    if isinstance(spec, (str, os.PathLike)):
        if not str(spec).endswith(".json") and not Path(spec).is_file():
            raise LabelError(f"unknown label set {str(spec)!r}: name one of "
                             f"{', '.join(LABEL_SETS)} or a classes.json file")
        return read_label_set(spec)
    return LabelSet.of("custom", list(spec))


@dataclasses.dataclass(frozen=True)
class LabelMapping:
    """Where each class of ``source`` goes in ``target``: an index, or None (ignored)."""

    source: LabelSet
    target: LabelSet
    to: tuple[int | None, ...]  # per source class

    @classmethod
    def by_name(cls, source: LabelSet, target: LabelSet,
                explicit: Mapping[str, str | None] | None = None,
                where: str = "mapping") -> LabelMapping:
        """``explicit`` source -> target names (None: ignore); the rest by equal name."""
        explicit = dict(explicit or {})
        unknown = sorted(set(explicit) - set(source.classes))
        if unknown:
            raise LabelError(f"{where}: maps {unknown}, which are not classes of "
                             f"{source.name} ({', '.join(source.classes)})")
        to = []
        for c in source.classes:
            t = explicit[c] if c in explicit else (c if c in target.classes else None)
            if t is not None and t not in target.classes:
                raise LabelError(f"{where}: maps {c!r} to {t!r}, which is not a class of "
                                 f"{target.name} ({', '.join(target.classes)})")
            to.append(None if t is None else target.index(t))
        return cls(source, target, tuple(to))

    @property
    def is_identity(self) -> bool:
        """Whether the mapping changes nothing (same classes, each to itself)."""
        return self.source.classes == self.target.classes and self.to == tuple(
            range(len(self.source)))

    def table(self) -> np.ndarray:
        """(256,) uint8 lookup: a source mask value -> its target index, or 255 (ignored:
        dropped classes, the source's ignore value and values that are no class)."""
        lut = np.full(256, IGNORE, np.uint8)
        for i, t in enumerate(self.to):
            if t is not None:
                lut[i] = t
        return lut

    def apply(self, label: np.ndarray) -> np.ndarray:
        """A source-indexed mask in target indices (255 where ignored)."""
        return self.table()[np.asarray(label, np.uint8)]

    def sources_of(self, target_class: str) -> tuple[str, ...]:
        """The source classes that become ``target_class``."""
        t = self.target.index(target_class)
        return tuple(c for c, i in zip(self.source.classes, self.to, strict=True) if i == t)

    def describe(self) -> list[str]:
        """One line per merged, renamed or ignored class (what a user should check)."""
        lines = []
        for name in self.target.classes:
            src = self.sources_of(name)
            if len(src) > 1:
                lines.append(f"{' + '.join(src)} -> {name}")
            elif src and src[0] != name:
                lines.append(f"{src[0]} -> {name}")
        dropped = [c for c, i in zip(self.source.classes, self.to, strict=True) if i is None]
        if dropped:
            lines.append(f"ignored: {', '.join(dropped)}")
        unfed = [n for n in self.target.classes if not self.sources_of(n)]
        if unfed:
            lines.append(f"never labelled: {', '.join(unfed)}")
        return lines


def read_mapping(path: str | os.PathLike, source: LabelSet) -> LabelMapping:
    """The mapping file at ``path`` applied to ``source`` (see the module docstring)."""
    path = Path(path)
    spec = _read_json(path, "no such mapping file")
    if not isinstance(spec, dict) or "to" not in spec or not isinstance(spec.get("map", {}),
                                                                          dict):
        raise LabelError(f"{path}: expected {{\"to\": <label set name, classes.json or class "
                         "list>, \"map\": {source class: target class or null}}")
    to = spec["to"]
    try:
        if isinstance(to, dict):
            target = LabelSet.from_json(to, f"{path}: \"to\"")
        elif isinstance(to, list):
            target = LabelSet.of(str(spec.get("name", path.stem)), to)
        elif isinstance(to, str) and to.endswith(".json"):
            target = read_label_set(path.parent / to)
        elif isinstance(to, str):
            target = get_label_set(to)
        else:
            raise LabelError("expected a label set name, a classes.json path, a class list or "
                             f"a classes.json object, not {to!r}")
    except LabelError as e:
        raise LabelError(f"{path}: \"to\": {e}") from None
    return LabelMapping.by_name(source, target, spec.get("map", {}), str(path))

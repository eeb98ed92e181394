"""The datasets SegFace was released for, and what each implies for a model's input and scores.

A model's classes, whether it aligns its input with 5 landmarks (LaPa) or crops it to the box of
68 landmarks (Helen), which split training validates on, how training augments, and which merged
regions evaluation scores are properties of the dataset it was trained on, stated here once.
"""

from __future__ import annotations

import dataclasses

from segface_jax.labels import (  # noqa: F401  (the class lists, re-exported)
    CELEBAMASK_HQ_CLASSES,
    COLOURS,
    HELEN_CLASSES,
    LABEL_SETS,
    LAPA_CLASSES,
    LabelSet,
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A face-parsing dataset's classes and conventions, as upstream trained and scored on it."""

    name: str  # as on the command line and in the variant table
    title: str
    labels: LabelSet  # the classes in the decoder's token order, colours, mirror pairs
    splits: tuple[str, ...]
    val_split: str  # what training validates on
    aligns: bool = False  # models warp their input with 5 landmarks (the tanh warp)
    crops_to_face: bool = False  # models see the box of the 68 landmarks
    affine_augment: bool = False  # training applies upstream's random affine
    landmark_scale: float = 1.0  # stored landmarks x this = image pixels
    face_frame: str = "celebahq"  # how a detected face is cut out of a photo (faces.FRAMES)
    merged_f1: tuple[tuple[str, tuple[str, ...]], ...] = ()  # extra F1s: (region, its classes)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in the decoder's token order."""
        return self.labels.classes

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """One RGB colour per class, in class order."""
        return self.labels.palette

    @property
    def mirrored_classes(self) -> tuple[int, ...]:
        """For each class, the class it becomes in the mirror image (left and right parts
        swapped: ``leftbro`` <-> ``rightbro``, ...; the rest stay)."""
        return self.labels.mirrored_classes

    @property
    def uses_landmarks(self) -> bool:
        """Whether examples carry landmarks (LaPa's 106 points, Helen's 68)."""
        return self.aligns or self.crops_to_face

    def to_json(self) -> dict:
        """This dataset as JSON (a trained model's metadata records what it was trained on)."""
        out = dataclasses.asdict(self)
        out["labels"] = self.labels.to_json()
        return out

    @classmethod
    def from_json(cls, spec: dict) -> Dataset:
        """The dataset ``to_json`` wrote."""
        spec = dict(spec)
        labels = LabelSet.from_json(spec.pop("labels"), "dataset labels")
        spec["splits"] = tuple(spec["splits"])
        spec["merged_f1"] = tuple((region, tuple(names)) for region, names in
                                  spec.get("merged_f1", ()))
        return cls(labels=labels, **spec)


CELEBAMASK_HQ = Dataset("celebamask_hq", "CelebAMask-HQ", LABEL_SETS["celebamask_hq"],
                        ("train", "val", "test"), val_split="val")
LAPA = Dataset("lapa", "LaPa", LABEL_SETS["lapa"], ("train", "val", "test"), val_split="val",
               aligns=True, affine_augment=True, face_frame="lapa")
HELEN = Dataset(
    "helen", "Helen", LABEL_SETS["helen"], ("train", "test"),
    val_split="test",  # Helen has no validation split; upstream validates on test
    crops_to_face=True,
    face_frame="helen",
    landmark_scale=0.5,  # landmarks.txt is at twice the image scale
    merged_f1=(
        ("eyes", ("lefteye", "righteye")),
        ("brows", ("leftbro", "rightbro")),
        ("mouth", ("upperlip", "innermouth", "lowerlip")),
        ("overall", ("lefteye", "righteye", "leftbro", "rightbro", "nose", "upperlip",
                     "innermouth", "lowerlip")),
    ))
DATASETS: dict[str, Dataset] = {d.name: d for d in (CELEBAMASK_HQ, LAPA, HELEN)}


def get_dataset(name: str | Dataset) -> Dataset:
    """The dataset called ``name`` (a ``Dataset`` is returned as it is); ``ValueError``
    listing the known ones otherwise."""
    if isinstance(name, Dataset):
        return name
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]

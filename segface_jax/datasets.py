"""The datasets SegFace was released for, and what each implies for a model's input and scores.

A model's classes, whether it aligns its input with 5 landmarks (LaPa) or crops it to the box of
68 landmarks (Helen), which split training validates on, how training augments, and which merged
regions evaluation scores are properties of the dataset it was trained on, stated here once.
"""

from __future__ import annotations

import dataclasses

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

# One RGB colour per class name, so a class looks the same whatever the dataset.
COLOURS: dict[str, tuple[int, int, int]] = {
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



@dataclasses.dataclass(frozen=True)
class Dataset:
    """A face-parsing dataset's classes and conventions, as upstream trained and scored on it."""

    name: str  # as on the command line and in the variant table
    title: str
    classes: tuple[str, ...]  # in the decoder's class-token order
    splits: tuple[str, ...]
    val_split: str  # what training validates on
    aligns: bool = False  # models warp their input with 5 landmarks (the tanh warp)
    crops_to_face: bool = False  # models see the box of the 68 landmarks
    affine_augment: bool = False  # training applies upstream's random affine
    landmark_scale: float = 1.0  # stored landmarks x this = image pixels
    face_frame: str = "celebahq"  # how a detected face is cut out of a photo (faces.FRAMES)
    merged_f1: tuple[tuple[str, tuple[str, ...]], ...] = ()  # extra F1s: (region, its classes)

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """One RGB colour per class, in class order."""
        return tuple(COLOURS[c] for c in self.classes)

    @property
    def mirrored_classes(self) -> tuple[int, ...]:
        """For each class, the class it becomes in the mirror image (left and right parts
        swapped: ``leftbro`` <-> ``rightbro``, ...; the rest stay)."""
        index = {name: i for i, name in enumerate(self.classes)}

        def mirror(name: str) -> str:
            for a, b in (("left", "right"), ("right", "left")):
                if name.startswith(a) and (b + name[len(a):]) in index:
                    return b + name[len(a):]
            return name

        return tuple(index[mirror(name)] for name in self.classes)

    @property
    def uses_landmarks(self) -> bool:
        """Whether examples carry landmarks (LaPa's 106 points, Helen's 68)."""
        return self.aligns or self.crops_to_face


CELEBAMASK_HQ = Dataset("celebamask_hq", "CelebAMask-HQ", CELEBAMASK_HQ_CLASSES,
                        ("train", "val", "test"), val_split="val")
LAPA = Dataset("lapa", "LaPa", LAPA_CLASSES, ("train", "val", "test"), val_split="val",
               aligns=True, affine_augment=True, face_frame="lapa")
HELEN = Dataset(
    "helen", "Helen", HELEN_CLASSES, ("train", "test"),
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


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]

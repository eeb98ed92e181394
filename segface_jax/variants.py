"""The released SegFace variants, stated once and used everywhere."""

from __future__ import annotations

import dataclasses
from typing import Any

from segface_jax.datasets import DATASETS, Dataset


@dataclasses.dataclass(frozen=True)
class Variant:
    """One released checkpoint: which backbone, dataset and resolution it was trained for; or a
    model trained from one (``retrained``) on its own dataset and classes."""

    name: str
    backbone: str
    dataset: str
    resolution: int
    mean_f1: float | None
    trained_on: Dataset | None = None  # a retrained model's dataset (None: the released one)
    encoder_overrides: tuple[tuple[str, Any], ...] = ()  # a smaller encoder (tests, demos)

    @property
    def data(self) -> Dataset:
        """The dataset it was trained on, with the conventions that implies."""
        return self.trained_on or DATASETS[self.dataset]

    @property
    def released(self) -> bool:
        """Whether this is one of SegFace's released checkpoints (not a model trained here)."""
        return VARIANTS.get(self.name) == self

    def retrained(self, name: str, data: Dataset, resolution: int | None = None,
                  encoder_overrides: tuple[tuple[str, Any], ...] = ()) -> Variant:
        """The model a run trains from this variant's network on ``data`` (its classes)."""
        return dataclasses.replace(self, name=name, dataset=data.name, trained_on=data,
                                   resolution=resolution or self.resolution, mean_f1=None,
                                   encoder_overrides=tuple(encoder_overrides))

    def to_json(self) -> dict[str, Any]:
        """A retrained model's description, for its checkpoint's metadata."""
        return {"name": self.name, "backbone": self.backbone, "resolution": self.resolution,
                "dataset": self.data.to_json(),
                "encoder_overrides": [list(kv) for kv in self.encoder_overrides]}

    @classmethod
    def from_json(cls, spec: dict[str, Any]) -> Variant:
        """The model ``to_json`` described."""
        data = Dataset.from_json(spec["dataset"])
        return cls(spec["name"], spec["backbone"], data.name, int(spec["resolution"]), None,
                   trained_on=data, encoder_overrides=tuple(
                       (k, tuple(v) if isinstance(v, list) else v)
                       for k, v in spec.get("encoder_overrides", ())))

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in the decoder's token order."""
        return self.data.classes

    @property
    def num_classes(self) -> int:
        """Number of output channels of the logits."""
        return len(self.classes)

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """One RGB colour per class, in class order."""
        return self.data.palette

    @property
    def needs_landmarks(self) -> bool:
        """True when the model aligns its input with 5 face landmarks (LaPa)."""
        return self.data.aligns

    @property
    def uses_landmarks(self) -> bool:
        """True when given landmarks change the input: LaPa's alignment, Helen's 68-point crop."""
        return self.data.aligns or self.data.crops_to_face

    @property
    def hub_filename(self) -> str:
        """Path of the release file in the Hugging Face repo."""
        return f"{self.name}/model_299.pt"


HUB_REPO = "kartiknarayan/SegFace"

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("convnext_celeba_512", "convnext_base", "celebamask_hq", 512, 89.22),
    Variant("efficientnet_celeba_512", "efficientnet_v2_m", "celebamask_hq", 512, 88.94),
    Variant("mobilenet_celeba_512", "mobilenet_v3_large", "celebamask_hq", 512, 87.91),
    Variant("resnet_celeba_512", "resnet101", "celebamask_hq", 512, 87.50),
    Variant("swinb_celeba_224", "swin_b", "celebamask_hq", 224, 87.47),
    Variant("swinb_celeba_256", "swin_b", "celebamask_hq", 256, 87.66),
    Variant("swinb_celeba_448", "swin_b", "celebamask_hq", 448, 88.77),
    Variant("swinb_celeba_512", "swin_b", "celebamask_hq", 512, 88.96),
    Variant("swinv2b_celeba_512", "swin_v2_b", "celebamask_hq", 512, 88.73),
    Variant("swinb_lapa_224", "swin_b", "lapa", 224, 92.50),
    Variant("swinb_lapa_256", "swin_b", "lapa", 256, 92.61),
    Variant("swinb_lapa_448", "swin_b", "lapa", 448, 93.03),
    Variant("swinb_lapa_512", "swin_b", "lapa", 512, 93.03),
    Variant("swinb_helen_512", "swin_b", "helen", 512, None),
)}

class UnknownVariantError(ValueError):
    """Raised for a variant name that SegFace never released."""


def checkpoint_variant(metadata: dict[str, Any]) -> Variant:
    """The model a checkpoint's metadata describes: a released variant by name, or a retrained
    model's own description (``"model"``)."""
    if "model" in metadata:
        try:
            return Variant.from_json(metadata["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnknownVariantError(f"the model description is incomplete ({e})") from None
    if "variant" not in metadata:
        raise UnknownVariantError("no variant named")
    return get_variant(metadata["variant"])


def get_variant(name: str) -> Variant:
    """Look up a released variant by name, with a message listing the valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariantError(
            f"unknown variant {name!r}; released variants are: {', '.join(sorted(VARIANTS))}"
        ) from None

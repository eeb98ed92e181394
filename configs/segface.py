"""SegFace's training recipe, for each released checkpoint: ``--config configs/segface.py:VARIANT``.

Every released model was trained with the same recipe; only the backbone, the dataset and the
resolution differ, and those come with the variant. For example, Swin-B on LaPa at 512 px:

    segface-jax convert-backbone --arch swin_b --out swin_b-imagenet
    segface-jax data check --dataset lapa --root /data/LaPa
    segface-jax train --config configs/segface.py:swinb_lapa_512 --workdir runs/swinb_lapa_512 \\
        --set data_root=/data/LaPa --set init_path=swin_b-imagenet
    segface-jax eval --variant swinb_lapa_512 --weights runs/swinb_lapa_512/best/<step> \\
        --dataset lapa --root /data/LaPa

Add ``--resume`` to continue an interrupted run; on several hosts run one process per host
with ``--num-processes N --process-id I --coordinator HOST0:PORT``; ``--set key=value``
overrides any field below (``global_batch``, ``dtype=bfloat16``, ``remat=block``, ...).

What each should reach on its test split (mean F1 over the classes except background, as
reported by the paper; upstream lists the Helen model without a figure):

| variant                 | backbone           | dataset       | px  | mean F1 |
|-------------------------|--------------------|---------------|-----|---------|
| swinb_celeba_224        | swin_b             | celebamask_hq | 224 | 87.47   |
| swinb_celeba_256        | swin_b             | celebamask_hq | 256 | 87.66   |
| swinb_celeba_448        | swin_b             | celebamask_hq | 448 | 88.77   |
| swinb_celeba_512        | swin_b             | celebamask_hq | 512 | 88.96   |
| swinv2b_celeba_512      | swin_v2_b          | celebamask_hq | 512 | 88.73   |
| convnext_celeba_512     | convnext_base      | celebamask_hq | 512 | 89.22   |
| efficientnet_celeba_512 | efficientnet_v2_m  | celebamask_hq | 512 | 88.94   |
| mobilenet_celeba_512    | mobilenet_v3_large | celebamask_hq | 512 | 87.91   |
| resnet_celeba_512       | resnet101          | celebamask_hq | 512 | 87.50   |
| swinb_lapa_224          | swin_b             | lapa          | 224 | 92.50   |
| swinb_lapa_256          | swin_b             | lapa          | 256 | 92.61   |
| swinb_lapa_448          | swin_b             | lapa          | 448 | 93.03   |
| swinb_lapa_512          | swin_b             | lapa          | 512 | 93.03   |
| swinb_helen_512         | swin_b             | helen         | 512 | -       |
"""

from segface_jax.train.config import TrainConfig, TrainingError
from segface_jax.variants import VARIANTS


def get_config(variant: str | None = None) -> TrainConfig:
    """Upstream's recipe for ``variant``: every hyper-parameter that defines it."""
    if variant not in VARIANTS:
        raise TrainingError(f"name the variant to train: --config configs/segface.py:VARIANT, "
                            f"VARIANT one of {', '.join(VARIANTS)} (got {variant!r})")
    return TrainConfig(
        variant=variant,  # backbone, dataset, classes and resolution come with it
        epochs=300,  # upstream releases the model after its 300th epoch (model_299.pt)
        global_batch=32,  # 4 images per GPU on 8 GPUs
        dice_group=4,  # the Dice loss is computed per GPU, over groups of 4 images
        lr=1e-4,  # AdamW
        weight_decay=1e-5,  # decoupled, on every parameter (norms and biases too)
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,  # torch's AdamW defaults
        milestones=(80, 200),  # MultiStepLR: the learning rate x gamma at these epochs
        gamma=0.1,
        init="imagenet",  # the encoder from torchvision's ImageNet weights (`convert-backbone`
        #                   output as init_path); the fusion and decoder from scratch
    )

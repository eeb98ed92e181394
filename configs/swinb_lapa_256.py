"""swinb_lapa_256: swin_b on LaPa at 256 px (paper: mean F1 92.61).

Upstream's recipe: AdamW (lr 1e-4, weight decay 1e-5 on every parameter, betas 0.9/0.999,
eps 1e-8), MultiStepLR at epochs 80 and 200 (x0.1), 300 epochs, global batch 32 (8 GPUs x 4,
Dice per GPU batch of 4), loss 0.5 CE + 0.5 Dice, encoder from torchvision's ImageNet weights.

    segface-jax convert-backbone --arch swin_b --out swin_b-imagenet
    segface-jax data check --dataset lapa --root /data/LaPa
    segface-jax train --config configs/swinb_lapa_256.py \\
        --workdir runs/swinb_lapa_256 \\
        --set data_root=/data/LaPa --set init_path=swin_b-imagenet

Add --resume to continue an interrupted run; on several hosts run one process per host with
--num-processes N --process-id I --coordinator HOST0:PORT.
"""

from segface_jax.train.trainer import TrainConfig


def get_config() -> TrainConfig:
    """The released recipe of swinb_lapa_256."""
    return TrainConfig(variant="swinb_lapa_256", init="imagenet")

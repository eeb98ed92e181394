"""mobilenet_celeba_512: mobilenet_v3_large on CelebAMask-HQ at 512 px (paper: mean F1 87.91).

Upstream's recipe: AdamW (lr 1e-4, weight decay 1e-5 on every parameter, betas 0.9/0.999,
eps 1e-8), MultiStepLR at epochs 80 and 200 (x0.1), 300 epochs, global batch 32 (8 GPUs x 4,
Dice per GPU batch of 4), loss 0.5 CE + 0.5 Dice, encoder from torchvision's ImageNet weights.

    segface-jax convert-backbone --arch mobilenet_v3_large --out mobilenet_v3_large-imagenet
    segface-jax data check --dataset celebamask_hq --root /data/CelebAMask-HQ
    segface-jax train --config configs/mobilenet_celeba_512.py \\
        --workdir runs/mobilenet_celeba_512 \\
        --set data_root=/data/CelebAMask-HQ --set init_path=mobilenet_v3_large-imagenet

Add --resume to continue an interrupted run; on several hosts run one process per host with
--num-processes N --process-id I --coordinator HOST0:PORT.
"""

from segface_jax.train.trainer import TrainConfig


def get_config() -> TrainConfig:
    """The released recipe of mobilenet_celeba_512."""
    return TrainConfig(variant="mobilenet_celeba_512", init="imagenet")

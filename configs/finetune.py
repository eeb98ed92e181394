"""Fine-tune a released SegFace model on your own data and classes: ``configs/finetune.py:VARIANT``.

VARIANT is the released model to start from (its backbone and resolution; see
`segface-jax variants`). The data is a folder in the generic layout, and its ``classes.json``
decides the new model's classes (or a label mapping's target does, with
``--set label_map=map.json``). Classes the released model also has (by name, or through the
mapping) start from its class tokens; new classes start fresh. Worked example, starting from
the CelebAMask-HQ Swin-B model (the same steps as README's "Train on your own data"):

    # 1. your data: images/, masks/ (PNG of class indices, same stem), classes.json;
    #    splits as train/ val/ test/ sub-folders or train.txt / val.txt lists
    segface-jax data check --dataset folder --root /data/mine
    # 2. the released model, converted once (or any `segface-jax convert` directory)
    segface-jax convert model_299.pt swinb_celeba_512 --variant swinb_celeba_512
    # 3. fine-tune; the trained model is written to runs/mine/model
    segface-jax train --config configs/finetune.py:swinb_celeba_512 --workdir runs/mine \\
        --set data_root=/data/mine --set init_path=swinb_celeba_512
    # 4. its metrics on your test split (per-class F1, confusion matrix), and its predictions
    segface-jax eval --weights runs/mine/model --dataset folder --root /data/mine --split test
    segface-jax predict photos/ --weights runs/mine/model

Large datasets read faster from a TFDS build: `segface-jax data build --dataset folder
--root /data/mine --data-dir /data/tfds`, then `--set tfds_dir=/data/tfds` instead of
data_root (validation still reads data_root's val split when given).

What to expect: no published figure exists for your data. Validation prints the mean F1 and
the F1 of every class of the new set each ``eval_every_epochs``, and the best state is kept in
``WORKDIR/best``. These are starting values for a few hundred to a few thousand images; with
more data, ``freeze=none`` and more epochs approach upstream's own recipe
(``configs/segface.py``).
"""

from segface_jax.train.config import TrainConfig, TrainingError
from segface_jax.variants import VARIANTS


def get_config(variant: str | None = None) -> TrainConfig:
    """Fine-tuning from ``variant`` on a generic-layout dataset: every hyper-parameter."""
    if variant not in VARIANTS:
        raise TrainingError(f"name the released model to start from: --config "
                            f"configs/finetune.py:VARIANT, VARIANT one of {', '.join(VARIANTS)} "
                            f"(got {variant!r})")
    return TrainConfig(
        variant=variant,  # the network (backbone, resolution) and the weights' classes
        dataset="folder",  # images/, masks/, classes.json at data_root (or a TFDS build)
        init="segface",  # init_path: the released model converted (`segface-jax convert`)
        freeze="encoder",  # the ImageNet+SegFace encoder stays; fusion and decoder adapt
        epochs=50,
        global_batch=8,  # small datasets: more steps per epoch
        dice_group=None,  # one Dice over the whole batch
        lr=1e-4,  # upstream's AdamW peak rate; the decoder adapts fast from its tokens
        weight_decay=1e-5,
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        milestones=(40,),  # x gamma for the last 10 epochs
        gamma=0.1,
        eval_every_epochs=5,
    )

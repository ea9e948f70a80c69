"""ResNet-20 (He et al. 2016) on CIFAR-10, optionally with a quantization-aware regularizer:
the model of the study on all of CIFAR-10 on the CPU (`--scale cpu-full`).

    qarjax train --config=configs/resnet20_cifar10.py --workdir=runs/resnet20 \
        --config.dataset=imagefolder:../shared/data/cifar10-jpeg.tar.gz
    qarjax run --config=configs/resnet20_cifar10.py:nearest --workdir=runs/resnet20_nearest \
        --config.dataset=imagefolder:../shared/data/cifar10-jpeg.tar.gz --config.reg.lam=3

30 epochs at batch 128 (Nesterov SGD, lr 0.1, cosine, 1 warm-up epoch, weight decay 5e-4 on
the kernels, crop + flip): a short schedule for a 2-core CPU (about 5 minutes an epoch there),
where He et al. train 64k steps (164 epochs) for 91.25%. The regularized phase is the last 4
epochs (from epoch 26), branched off the plain run by the study. ARG picks the family;
`runlocal` shrinks everything for a smoke test.
"""

from qarjax.config import apply_config_arg, default_config


def get_config(arg: str | None = None):
    config = default_config()
    config.model = "resnet20"
    config.dataset = "cifar10"
    config.num_epochs = 30
    config.batch_size = 128
    config.optimizer = "nesterov"
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    config.warmup_epochs = 1
    config.augment.crop_padding, config.augment.flip = 4, True
    config.compute_dtype = "float32"
    config.holdout = 5000  # a validation set for the study's search (never the test set)
    config.quant.tune_epochs = 1
    config.reg.k = 4
    # the base the study's lambda search multiplies, not a family's best: the CPU study chose
    # nearest 3, cosine 10 (README); a run of one family: --config.reg.lam=3
    config.reg.lam = 0.1
    config.reg.start_epoch = 26
    return apply_config_arg(config, arg)

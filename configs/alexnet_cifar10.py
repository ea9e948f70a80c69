"""AlexNet (CIFAR variant) on CIFAR-10, optionally with a quantization-aware regularizer.

    qarjax train --config=configs/alexnet_cifar10.py --workdir=runs/alexnet \
        --config.dataset=imagefolder:../shared/data/cifar10-jpeg.tar.gz
    qarjax run --config=configs/alexnet_cifar10.py:nearest --workdir=runs/alexnet_nearest \
        --config.dataset=imagefolder:../shared/data/cifar10-jpeg.tar.gz

ARG (after the colon) picks the regularizer family (default none). `runlocal` shrinks
everything for a CPU smoke test: configs/alexnet_cifar10.py:runlocal or :nearest,runlocal.
"""

from qarjax.config import apply_config_arg, default_config


def get_config(arg: str | None = None):
    config = default_config()
    config.model = "alexnet"
    config.dataset = "cifar10"
    config.num_epochs = 60
    config.batch_size = 512
    config.optimizer = "nesterov"
    config.learning_rate = 0.02
    config.weight_decay = 5e-4
    config.warmup_epochs = 2
    config.compute_dtype = "bfloat16"
    # CIFAR-10's recipe whichever way the data loads (an image folder alone would not flip)
    config.augment.crop_padding, config.augment.flip = 4, True
    config.reg.k = 4
    # the base the study's lambda search multiplies, not a family's best: the CPU study chose
    # nearest 3, cosine 10 (README); a run of one family: --config.reg.lam=3
    config.reg.lam = 0.1
    config.reg.start_epoch = 30
    return apply_config_arg(config, arg)

"""VGG16 at a quarter of its width (16 ... 128 channels, the same 13 conv layers with batch norm
and no skip connections; 0.96 M parameters) on CIFAR-10: the VGG of the study on all of
CIFAR-10 on the CPU (`--scale cpu-full`), the kind of network on which the paper reports
plain k-means collapsing at low K.

    qarjax train --config=configs/vgg16_narrow_cifar10.py --workdir=runs/vgg16n \
        --config.dataset=imagefolder:../shared/data/cifar10-jpeg.tar.gz

30 epochs at batch 128 (Nesterov SGD, lr 0.05, cosine, weight decay 5e-4, crop + flip,
dropout 0.1 before the two 128-unit dense layers); the regularized phase is the last 4
epochs. ARG picks the family; `runlocal` shrinks everything.
"""

from qarjax.config import apply_config_arg, default_config


def get_config(arg: str | None = None):
    config = default_config()
    config.model = "vgg16"
    config.model_width = 0.25
    config.dataset = "cifar10"
    config.num_epochs = 30
    config.batch_size = 128
    config.optimizer = "nesterov"
    config.learning_rate = 0.05
    config.weight_decay = 5e-4
    config.warmup_epochs = 1
    config.dropout = 0.1
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

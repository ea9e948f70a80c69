"""Demo: the small CNN on the embedded cifar10_mini, with the nearest regularizer (K = 4).

    qarjax train --config configs/demo.py --workdir runs/demo_train
    qarjax run --config configs/demo.py --workdir runs/demo      # train, quantize, tune, report

Runs in about a minute on a 2-core CPU.
"""

from qarjax.config import default_config


def get_config(arg: str | None = None):
    config = default_config()
    config.model = "cnn_small"
    config.dataset = "cifar10_mini"
    config.num_epochs = 12
    config.batch_size = 128
    config.learning_rate = 0.05
    config.warmup_epochs = 1
    config.reg.family = arg or "nearest"
    config.reg.k = 4
    # Measured on cifar10_mini (nearest, K = 4): lam 0.1 left the quantized model 8.6 points
    # below its float accuracy, lam 0.3 6.7, lam 1.0 with a 2-epoch warm-up about 3.
    config.reg.lam = 1.0
    config.reg.schedule = "warmup"
    config.reg.warmup_epochs = 2
    config.reg.start_epoch = 4
    return config

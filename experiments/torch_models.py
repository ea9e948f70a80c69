"""The benchmark's PyTorch twins of qarjax's models (a benchmark-only import: the package never
depends on torch). Same layers, shapes and recipe as `qarjax.models`: cnn_small, resnet20 and
vgg16 (with `width`), NCHW or channels_last, and the same on-device data preparation as the
JAX step (uint8 gather, per-image random crop after 4-pixel zero padding, random flip,
normalization).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M")  # fmt: skip


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout, momentum=0.1),  # torch's 0.1 = flax's 0.9
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16), nn.MaxPool2d(2), conv_bn(16, 32), nn.MaxPool2d(2),
            conv_bn(32, 64), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc1, self.fc2 = nn.Linear(64 * 4 * 4, 128), nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(y + shortcut)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())  # fmt: skip
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class VGG16(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, dropout: float = 0.3):
        super().__init__()
        scaled = lambda c: max(1, round(c * width))
        layers, cin = [], 3
        for item in VGG16_PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, scaled(item)))
                cin = scaled(item)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(cin, scaled(512)), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(scaled(512), scaled(512)), nn.ReLU(),
            nn.Linear(scaled(512), num_classes),
        )  # fmt: skip

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def build(name: str, width: float = 1.0) -> nn.Module:
    if name == "cnn_small":
        return SmallCNN()
    if name == "resnet20":
        return ResNet20()
    if name == "vgg16":
        return VGG16(width=width)
    raise ValueError(f"no PyTorch twin of {name!r}")


class TorchStep:
    """One SGD (Nesterov, momentum 0.9, weight decay 5e-4) step of `model` on a batch gathered
    from uint8 NHWC images, augmented per image, as qarjax's step does on its device."""

    def __init__(self, name, images, labels, mean, std, *, width=1.0, channels_last=True):
        self.model = build(name, width)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.images = torch.from_numpy(images)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(labels).long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9,
                                   nesterov=True, weight_decay=5e-4)  # fmt: skip
        self.generator = torch.Generator().manual_seed(0)

    def prepare(self, idx, pad: int = 4):
        x = self.images[idx].permute(0, 3, 1, 2)  # N, C, H, W uint8
        n, _, h, w = x.shape
        x = F.pad(x, (pad, pad, pad, pad))
        g = self.generator
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=g)
        rows = (dy + torch.arange(h).view(1, h, 1)).expand(n, h, w)
        cols = dx + torch.arange(w).view(1, 1, w)
        flip = torch.rand(n, 1, 1, generator=g) < 0.5
        cols = torch.where(flip, 2 * dx + w - 1 - cols, cols).expand(n, h, w)
        batch = torch.arange(n).view(n, 1, 1).expand(n, h, w)
        x = x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # per-image crop, flip
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, idx):
        x = self.prepare(idx)
        loss = F.cross_entropy(self.model(x), self.labels[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

"""Builds the embedded `cifar10_mini` dataset from the shared CIFAR-10 JPEG archive.

A class-balanced random subset (seeded, so the asset is reproducible): 500 train and 100 test
images per class, kept as the archive's original JPEG bytes (no re-encoding), written as
qarjax/assets/cifar10_mini.tar.gz in the image-folder layout.

    python experiments/make_cifar10_mini.py --src ../shared/data/cifar10-jpeg.tar.gz
"""

import argparse
import io
import random
import tarfile
from collections import defaultdict
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "qarjax" / "assets" / "cifar10_mini.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    per_split = {"train": args.train_per_class, "test": args.test_per_class}
    members = defaultdict(list)
    with tarfile.open(args.src, "r:gz") as src:
        data = {}
        for m in src:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 3 and parts[0] in per_split:
                members[(parts[0], parts[1])].append(m.name)
                data[m.name] = src.extractfile(m).read()
    rng = random.Random(args.seed)
    chosen = []
    for (split, _cls), names in sorted(members.items()):
        chosen += sorted(rng.sample(sorted(names), per_split[split]))
    with tarfile.open(args.out, "w:gz", compresslevel=9) as out:
        for name in chosen:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data[name]), 0
            out.addfile(info, io.BytesIO(data[name]))
    print(
        f"wrote {len(chosen)} images to {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main()

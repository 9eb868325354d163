"""The plain PyTorch recipe a user would otherwise run: the study's protocol as in the 2019 PyTorch
tutorial "Finetuning Torchvision Models" (ImageFolder, the tutorial's transforms, a hand-written
loop, SGD 0.001 / 0.9, best-accuracy weights kept). Written for `bench.py` to measure against.

    python benchmarks/baseline.py data/rooms --arch resnet18 --size 128 --epochs 2 --unfreeze
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch
from torch import nn
from torchvision import datasets, models, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build(arch: str, n_classes: int, unfreeze: bool) -> nn.Module:
    """The tutorial's initialize_model, without pretrained weights (none can be downloaded here)."""
    model = getattr(models, arch)(
        weights=None,
        **({"aux_logits": True, "init_weights": True} if arch == "inception_v3" else {}),
    )
    if not unfreeze:
        for p in model.parameters():
            p.requires_grad = False
    if arch == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, n_classes)
    elif arch in ("alexnet", "vgg11_bn"):
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, n_classes)
    elif arch == "densenet121":
        model.classifier = nn.Linear(model.classifier.in_features, n_classes)
    else:
        model.AuxLogits.fc = nn.Linear(model.AuxLogits.fc.in_features, n_classes)
        model.fc = nn.Linear(model.fc.in_features, n_classes)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task_dir")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--unfreeze", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tfms = {
        "train": transforms.Compose(
            [
                transforms.RandomResizedCrop(args.size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        ),
        "valid": transforms.Compose(
            [
                transforms.Resize(args.size),
                transforms.CenterCrop(args.size),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        ),
    }
    sets = {s: datasets.ImageFolder(f"{args.task_dir}/{s}", tfms[s]) for s in ("train", "valid")}
    loaders = {
        s: torch.utils.data.DataLoader(
            sets[s], batch_size=args.bs, shuffle=s == "train", num_workers=args.workers
        )
        for s in sets
    }
    model = build(args.arch, len(sets["train"].classes), args.unfreeze).to(device)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9
    )
    criterion = nn.CrossEntropyLoss()
    history, best, best_weights, train_seconds = [], 0.0, None, 0.0
    fit_start = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        for phase in ("train", "valid"):
            model.train(phase == "train")
            correct, seen = 0, 0
            for x, y in loaders[phase]:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    if phase == "train" and args.arch == "inception_v3":
                        out, aux = model(x)
                        loss = criterion(out, y) + 0.4 * criterion(aux, y)
                    else:
                        out = model(x)
                        loss = criterion(out, y)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += (out.argmax(1) == y).sum().item()
                seen += len(y)
            if phase == "train":
                train_seconds += time.perf_counter() - epoch_start
            else:
                acc = correct / seen
                history.append(acc)
                if acc > best:
                    best, best_weights = acc, copy.deepcopy(model.state_dict())
        print(
            f"epoch {epoch + 1}: valid accuracy {history[-1]:.4f}, {time.perf_counter() - epoch_start:.1f}s",
            flush=True,
        )
    fit_seconds = time.perf_counter() - fit_start
    model.load_state_dict(best_weights)  # the tutorial returns the best epoch's model
    n_train = len(sets["train"])
    print(
        json.dumps(
            {
                "train_images_per_s": n_train * args.epochs / train_seconds,
                "seconds_per_epoch": train_seconds / args.epochs,
                "fit_seconds": fit_seconds,
                "final_acc": history[-1],
                "best_acc": best,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20
                if device.type == "cuda"
                else None,
            }
        )
    )


if __name__ == "__main__":
    main()

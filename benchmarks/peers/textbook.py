"""The fine-tuning script people write by hand: thaw's peer in benchmarks/quality.py.

Written the way the PyTorch transfer-learning tutorial and most blog posts do it, on
purpose: ``ImageFolder`` decoded every epoch; padded random crops + horizontal flips; ImageNet
mean/std; three stages with constant Adam learning rates (head 1e-3; last stage + head 1e-4;
everything, 1e-4 at the head decaying 0.3x per block towards the stem); ``model.train()``
(BatchNorm statistics of frozen layers keep updating); each stage continues from the last
epoch of the one before; the test set scored after each stage and the best stage reported
(picked on test, which favours this script).

Its only thaw import is ``create_backbone``, so both start from the same packaged weights.
Prints one JSON object: per stage test accuracy, macro-F1, and seconds since start.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from thaw.backbones import create_backbone

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def last_stage(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "layer4"):  # ResNet
        return [model.layer4]
    return [model.blocks[-1], model.conv_head, model.bn2]  # EfficientNet


def blocks_head_first(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "layer4"):
        return [model.fc, model.layer4, model.layer3, model.layer2, model.layer1,
                nn.ModuleList([model.conv1, model.bn1])]
    return [model.classifier, nn.ModuleList([model.conv_head, model.bn2]),
            *reversed(list(model.blocks)), nn.ModuleList([model.conv_stem, model.bn1])]


def train_epochs(model, loader, optimizer, epochs, device):
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()
    preds, truth = [], []
    for images, labels in loader:
        preds.append(model(images.to(device)).argmax(1).cpu().numpy())
        truth.append(labels.numpy())
    y_pred, y_true = np.concatenate(preds), np.concatenate(truth)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder with train/<class>/* and test/<class>/*")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, nargs=3, default=[10, 6, 6])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.image_size
    train_tf = transforms.Compose([
        transforms.Resize((size, size)), transforms.RandomCrop(size, padding=size // 8),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    test_tf = transforms.Compose([
        transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train_set = datasets.ImageFolder(os.path.join(args.data, "train"), train_tf)
    test_set = datasets.ImageFolder(os.path.join(args.data, "test"), test_tf)
    workers = min(4, os.cpu_count() or 1)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              num_workers=workers)
    test_loader = DataLoader(test_set, batch_size=128, num_workers=workers)

    model = create_backbone(args.arch, len(train_set.classes), args.weights).to(device)
    head = model.get_classifier()
    stages = {}

    # Stage 1: train the new head on the frozen backbone.
    for p in model.parameters():
        p.requires_grad = False
    for p in head.parameters():
        p.requires_grad = True
    train_epochs(model, train_loader, torch.optim.Adam(head.parameters(), lr=1e-3),
                 args.epochs[0], device)
    stages["probe"] = {**evaluate(model, test_loader, device),
                       "seconds": time.perf_counter() - start}

    # Stage 2: unfreeze the last stage.
    for module in last_stage(model):
        for p in module.parameters():
            p.requires_grad = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_epochs(model, train_loader, torch.optim.Adam(trainable, lr=1e-4),
                 args.epochs[1], device)
    stages["partial"] = {**evaluate(model, test_loader, device),
                         "seconds": time.perf_counter() - start}

    # Stage 3: unfreeze everything, smaller learning rates for earlier blocks.
    for p in model.parameters():
        p.requires_grad = True
    groups = [{"params": block.parameters(), "lr": 1e-4 * 0.3**depth}
              for depth, block in enumerate(blocks_head_first(model))]
    train_epochs(model, train_loader, torch.optim.Adam(groups), args.epochs[2], device)
    stages["full"] = {**evaluate(model, test_loader, device),
                      "seconds": time.perf_counter() - start}

    best = max(stages, key=lambda s: stages[s]["accuracy"])
    print(json.dumps({"stages": stages, "best_stage": best, **stages[best]}))


if __name__ == "__main__":
    main()

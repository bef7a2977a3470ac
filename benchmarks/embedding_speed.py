"""Throughput of ``last_layer`` gradient embeddings against a plain eval forward pass, side by side.

    python -m benchmarks.embedding_speed [--model resnet18 --width 32 --n 2048]

Each repeat times the plain forward and the embedding pass back to back on the same data, so
machine noise hits both; the ratio is embedding throughput / forward throughput (≥ 0.8 is the bar).
"""

from __future__ import annotations

import argparse
import time

import torch

from sanitizer import gradient_embeddings
from sanitizer.data import ImageTensorDataset
from sanitizer.models import make_model


@torch.no_grad()
def plain_forward(model, images, batch_size):
    model.eval()
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_model(args.model, 10, 3, args.width).to(args.device)
    images = torch.rand(args.n, 3, 32, 32)
    data = ImageTensorDataset(images, torch.randint(0, 10, (args.n,)))
    dev_images = images.to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    results = {"forward": [], "last_layer (exact)": [], "last_layer (sketch 1024)": [], "logits": []}
    for _ in range(args.repeats):
        for name in results:
            sync()
            t0 = time.perf_counter()
            if name == "forward":
                plain_forward(model, dev_images, args.batch_size)
            else:
                kind = "logits" if name == "logits" else "last_layer"
                max_dim = 1024 if "sketch" in name else 10**7
                gradient_embeddings(model, data, embedding=kind, batch_size=args.batch_size, max_dim=max_dim)
            sync()
            results[name].append(time.perf_counter() - t0)
    base = min(results["forward"])
    print(f"{args.model} width {args.width}, {args.n} images, batch {args.batch_size}, device {args.device}")
    print("| pass | best seconds | throughput vs forward |\n|---|---|---|")
    for name, times in results.items():
        print(f"| {name} | {min(times):.3f} | {base / min(times):.2f} |")


if __name__ == "__main__":
    main()

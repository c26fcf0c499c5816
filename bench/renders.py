"""What rendering the viewer's PNGs in the worker costs, beside the forward pass it follows.

Since the worker renders each image's preview, greyscale heatmap and colour overlay (so the
results service only streams bytes), every screened image costs that CPU on the worker's
host. This measures, on this machine:

- model_images_per_s: the shipped model's forward pass with heatmaps, at `--batch` images
  of its input size, on CUDA when present (bf16 autocast, as the worker runs it), else CPU;
- render_cpu_ms_per_image: one thread rendering one full-size image's three PNGs;
- render_images_per_s: `--threads` threads rendering side by side (the worker's writers);
- render_to_model: render_images_per_s / model_images_per_s; above 1, rendering keeps up.

It needs only torch, numpy and Pillow: `python -m bench.renders --out renders.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from shared.imaging.renders import PREVIEW_SHRINK, heatmap_pngs, preview_png
from shared.ml.checkpoint import load_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "screening-synthetic" / "checkpoint.pt"


def model_images_per_s(batch: int, seconds: float) -> tuple[float, str, list[int]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(SHIPPED.read_bytes(), device=device)
    config = model.config
    inputs = torch.randn(batch, 1, config.input_height, config.input_width, device=device)
    cuda = device.type == "cuda"

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            model.forward_with_heatmap(inputs)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        forward()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward()
        done += batch
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    return done / (time.perf_counter() - started), name, [config.input_height, config.input_width]


def render(pixels: np.ndarray, heat: np.ndarray) -> int:
    grey, overlay = heatmap_pngs(heat)
    return len(preview_png(pixels, PREVIEW_SHRINK)) + len(grey) + len(overlay)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.renders")
    parser.add_argument("--height", type=int, default=3328)
    parser.add_argument("--width", type=int, default=2560)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--model-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    pixels = rng.random((args.height, args.width), dtype=np.float32)
    # A heatmap as the model makes them: low everywhere, one bright region.
    rows, columns = np.mgrid[0 : args.height // 4, 0 : args.width // 4]
    centre, spread = (args.height // 8, args.width // 10), args.width / 40
    distance = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2
    heat = (0.1 + 0.85 * np.exp(-distance / (2 * spread**2))).astype(np.float32)
    render(pixels, heat)  # warm-up
    started = time.process_time()
    for _ in range(8):
        render(pixels, heat)
    one_thread_ms = (time.process_time() - started) / 8 * 1000
    with ThreadPoolExecutor(args.threads) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: render(pixels, heat), range(args.images)))
        render_images_per_s = args.images / (time.perf_counter() - started)

    model_per_s, device, input_size = model_images_per_s(args.batch, args.model_seconds)
    results = {
        "device": device,
        "torch_version": torch.__version__,
        "image_size": [args.height, args.width],
        "model_input_size": input_size,
        "batch_size": args.batch,
        "model_images_per_s": round(model_per_s, 1),
        "render_cpu_ms_per_image": round(one_thread_ms, 2),
        "render_threads": args.threads,
        "render_images_per_s": round(render_images_per_s, 1),
        "render_to_model": round(render_images_per_s / model_per_s, 3),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

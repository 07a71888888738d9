"""
OCR reward throughput on CPU, so that training loops can be planned around it.

    python -m tools.bench_rewards                 # 32 images, 512x512
    python -m tools.bench_rewards --n 64 --size 1024

Renders short texts with Pillow's bundled font, warms RapidOCR up on one image, then times
one ocr_reward call over the batch and prints one line (images per second).
"""

import argparse
import os
import time

from PIL import Image, ImageDraw, ImageFont

import rewards

# -----------------------------------------------------------------------------
# defaults
N = 32        # images timed
SIZE = 512    # image side, SD3.5-M's training resolution
WORDS = ["Hello World", "OPEN 24 HOURS", "Coffee", "Flow OPD", "Sunset Boulevard", "Keep Calm", "Bakery", "EXIT"]
# -----------------------------------------------------------------------------


def render(text, size, seed):
    """Dark text on a light background, at a size and place that vary with the seed."""
    image = Image.new("RGB", (size, size), (235 - seed % 40, 230, 220 + seed % 30))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size // 12 + 4 * (seed % 5))
    draw.text((size // 16 + 7 * (seed % 6), size // 8 + (seed * 37) % (size // 2)), text, fill=(20, 20, 30), font=font)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--size", type=int, default=SIZE)
    args = parser.parse_args()
    texts = [WORDS[i % len(WORDS)] for i in range(args.n)]
    images = [render(t, args.size, i) for i, t in enumerate(texts)]
    prompts = [f'A sign that reads "{t}"' for t in texts]
    rewards.ocr_reward(images[:1], prompts[:1])  # loads the models and the ONNX sessions
    t0 = time.perf_counter()
    scores, _ = rewards.ocr_reward(images, prompts)
    dt = time.perf_counter() - t0
    print(f"ocr reward: {args.n / dt:.2f} images/s ({args.n} images {args.size}x{args.size}, CPU, "
          f"{os.cpu_count()} cores, mean reward {scores.mean():.3f})")


if __name__ == "__main__":
    main()

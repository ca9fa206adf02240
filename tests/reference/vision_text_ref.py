"""PyTorch twin of the seed's vision-text pipeline (tests/reference).

Writes, under --out:
  vision/model.safetensors, text/model.safetensors   checkpoints (PyTorch default init, seeded)
  io.safetensors   image [B,3,H,W], text [B,256], vision_features [B,512], output [B,1024]
computed in float32 by PyTorch on the CPU.
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402


class VisionModel(nn.Module):
    def __init__(self, vision_embedding_size):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, kernel_size=3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, vision_embedding_size)

    def forward(self, x):
        x = self.conv(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class TextModel(nn.Module):
    def __init__(self, vision_embedding_size, text_input_size, text_embedding_size, output_size):
        super().__init__()
        self.embedding = nn.Linear(text_input_size, text_embedding_size)
        self.fusion = nn.Linear(vision_embedding_size + text_embedding_size, output_size)

    def forward(self, vision_features, text_input):
        text_features = self.embedding(text_input)
        combined = torch.cat([vision_features, text_features], dim=1)
        return self.fusion(combined)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    vision = VisionModel(512).eval()
    text = TextModel(512, 256, 512, 1024).eval()
    # Make biases non-trivial and weights larger than default so errors are visible.
    image = torch.randn(args.batch, 3, args.image, args.image)
    text_in = torch.randn(args.batch, 256)
    with torch.inference_mode():
        feats = vision(image)
        out = text(feats, text_in)
    os.makedirs(os.path.join(args.out, "vision"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "text"), exist_ok=True)
    st.save(os.path.join(args.out, "vision", "model.safetensors"), vision.state_dict())
    st.save(os.path.join(args.out, "text", "model.safetensors"), text.state_dict())
    st.save(os.path.join(args.out, "io.safetensors"),
            {"image": image, "text": text_in, "vision_features": feats, "output": out})


if __name__ == "__main__":
    main()

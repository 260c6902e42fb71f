"""A/B of the locked EfficientNet's input size and pooled features for the demo's LiT model (issue 12), judged on
validation data: zero-shot mean per-class accuracy on OpenMoji's val split and text→image R@1 on the training
sources' val splits (first caption per image). The locked towers run once (bf16, channels-last); each variant
then trains only the two projections and the temperature on the cached features, for a few seconds a seed.

    python scripts/lit_features_ab.py --sizes 64 96 128 --seeds 0 1 2 > lit_features_ab.jsonl

Prints one JSON line per (size, pooling, seed). The demo's reported sets are scored too, for the record only;
the choice in ``configs/train/demo-lit.yaml`` was made on the val columns (docs/results/recipes.md).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

POOLINGS = {"head": (), "head+blocks 10,14,15": (10, 14, 15)}


def read_split(folder: Path) -> tuple[list[Image.Image], list[list[str]]]:
    images, captions = [], []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as archive:
            groups: dict[str, dict[str, bytes]] = {}
            for member in archive.getmembers():
                stem, ext = member.name.rsplit(".", 1)
                groups.setdefault(stem, {})[ext] = archive.extractfile(member).read()
        for group in groups.values():
            raw = group.get("png") or group.get("jpg") or group["webp"]
            images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
            captions.append(json.loads(group["json"])["captions"])
    return images, captions


def main() -> None:
    from clipforge.demo_data import prepare
    from clipforge.eval.zeroshot import class_prompts
    from clipforge.model import create_model
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import EvalTransform

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    data = prepare(progress=False)
    sources = [part["source"] for part in data.plan["train"]]
    splits = {(s, split): read_split(data.roots[s] / split) for s in sources for split in ("train", "val")}
    sets = {name: data.eval_set(name) for name in data.plan["evals"]}
    sets["style_shift_val"] = data.eval_set("style_shift_val", section="validation")
    text_model = create_model("lit-effnet-minilm").eval()
    tokenize = get_tokenizer(text_model.config)

    @torch.no_grad()
    def text_features(strings: list[str]) -> torch.Tensor:
        return torch.cat(
            [text_model.text.features(tokenize(strings[i : i + 256])) for i in range(0, len(strings), 256)]
        )

    captions = {key: text_features([c for caps in v[1] for c in caps]) for key, v in splits.items()}
    counts = {key: torch.tensor([len(c) for c in v[1]]) for key, v in splits.items()}
    prompts = {name: class_prompts(z.classnames, z.templates) for name, z in sets.items()}
    prompt_features = {name: text_features(p[0]) for name, p in prompts.items()}
    for size in args.sizes:
        for pooling, blocks in POOLINGS.items():
            model = create_model(
                "lit-effnet-minilm", vision={"image_size": size, "pool_blocks": blocks}
            ).eval()
            model = model.to(memory_format=torch.channels_last)
            transform = EvalTransform(size, model.config.preprocess)
            images = {key: image_features(model, transform, v[0]) for key, v in splits.items()}
            set_images = {name: image_features(model, transform, z.images) for name, z in sets.items()}
            for seed in args.seeds:
                row = {"size": size, "pooling": pooling, "seed": seed}
                row.update(train_and_score(images, captions, counts, sources, set_images, sets, prompts,
                                           prompt_features, seed, args.epochs))  # fmt: skip
                print(json.dumps(row), flush=True)


@torch.no_grad()
def image_features(model, transform, images: list[Image.Image]) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 128):
        x = torch.stack([transform(im) for im in images[i : i + 128]]).contiguous(
            memory_format=torch.channels_last
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(model.visual.features(x).float())
    return torch.cat(out)


def train_and_score(
    images, captions, counts, sources, set_images, sets, prompts, prompt_features, seed, epochs
):
    torch.manual_seed(seed)
    xi = torch.cat([images[(s, "train")] for s in sources])
    xt = torch.cat([captions[(s, "train")] for s in sources])
    n = torch.cat([counts[(s, "train")] for s in sources])
    start = torch.cumsum(n, 0) - n
    proj_i = torch.nn.Linear(xi.shape[1], 256, bias=False)
    proj_t = torch.nn.Linear(xt.shape[1], 256, bias=False)
    scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    params = [*proj_i.parameters(), *proj_t.parameters(), scale]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    batch, total = 256, epochs * (len(xi) // 256)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=total, pct_start=0.1)
    for _ in range(epochs):
        order = torch.randperm(len(xi))
        for k in range(len(xi) // batch):
            idx = order[k * batch : (k + 1) * batch]
            pick = start[idx] + (torch.rand(len(idx)) * n[idx]).long()
            a, b = F.normalize(proj_i(xi[idx]), dim=-1), F.normalize(proj_t(xt[pick]), dim=-1)
            logits = scale.exp().clamp(max=100) * a @ b.T
            y = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    scores = {}
    with torch.no_grad():
        for name, z in sets.items():
            owner = torch.tensor(prompts[name][1])
            text = F.normalize(proj_t(prompt_features[name]), dim=-1)
            classifier = F.normalize(
                torch.stack([text[owner == c].mean(0) for c in range(len(z.classnames))]), dim=-1
            )
            pred = (F.normalize(proj_i(set_images[name]), dim=-1) @ classifier.T).argmax(1).numpy()
            scores[name] = float(np.mean([(pred[z.labels == c] == c).mean() for c in np.unique(z.labels)]))
        r1 = []
        for s in sources:
            first = torch.cumsum(counts[(s, "val")], 0) - counts[(s, "val")]
            im = F.normalize(proj_i(images[(s, "val")]), dim=-1)
            tx = F.normalize(proj_t(captions[(s, "val")][first]), dim=-1)
            r1.append(float(((tx @ im.T).argmax(1) == torch.arange(len(im))).float().mean()))
        scores["val_t2i_R@1_mean"] = float(np.mean(r1))
    return scores


if __name__ == "__main__":
    main()

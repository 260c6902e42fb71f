"""`clipforge demo`: the main job."""

from __future__ import annotations

import argparse


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from clipforge import create_model, get_tokenizer, get_transforms
    from clipforge.images import load_image

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    tokenizer, transform = get_tokenizer(model), get_transforms(model)
    if args.image:
        image, source = load_image(args.image), args.image
    else:
        size = 256
        ramp = torch.linspace(0, 255, size).to(torch.uint8)
        pixels = torch.stack(
            [ramp.expand(size, size), ramp.expand(size, size).t(), torch.full((size, size), 90)], -1
        )
        image, source = Image.fromarray(pixels.to(torch.uint8).numpy()), "a generated 256x256 gradient"
    labels = ["a photo of a cat.", "a photo of a dog.", "a diagram."]
    images = transform(image).unsqueeze(0)
    tokens = tokenizer(labels)
    with torch.no_grad():
        out = model(images, tokens)
    probs = (out.logit_scale * out.image_features @ out.text_features.T).softmax(dim=-1)[0]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model        {model.config.name}: {params:,} parameters (random weights), {model.config.activation}"
    )
    print(f"image        {source} -> tensor {tuple(images.shape)}")
    print(f"tokens       {len(labels)} prompts -> {tuple(tokens.shape)}; first: {tokens[0, :8].tolist()}")
    print(f"embeddings   image {tuple(out.image_features.shape)}, text {tuple(out.text_features.shape)}")
    print(f"logit scale  {out.logit_scale.item():.2f} (1/0.07 at initialisation)")
    for label, p in zip(labels, probs.tolist()):
        print(f"  p({label!r}) = {p:.3f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a model, tokenize, preprocess one image, print shapes")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--image", default=None, help="an image file (default: a generated gradient)")
    p.set_defaults(func=_cmd_demo)

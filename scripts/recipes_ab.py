"""A/B of the small-data recipes (issue 12) on the demo's data, judged on validation data only.

Each recipe is the demo preset (``configs/train/demo.yaml``, from-scratch ``small`` CLIP) plus a few config keys,
trained for the same number of steps with each seed; the score is zero-shot mean per-class accuracy (prompt
ensemble) on OpenMoji's **val** split (a drawing style never trained on) and text→image R@1 on the training
sources' **val** splits. The demo's reported sets (OpenMoji train+test, held-out concepts) are never looked at.

    python scripts/recipes_ab.py --steps 150 --seeds 0 1 2 --out docs/results/recipes
    python scripts/recipes_ab.py --from-results docs/results/recipes/results.json   # re-render the table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RECIPES: dict[str, dict[str, object]] = {
    "baseline (softmax, learned τ)": {},
    "SigLIP sigmoid loss": {"loss.kind": "sigmoid"},
    "label smoothing 0.1": {"loss.label_smoothing": 0.1},
    "fixed temperature (τ = 0.07)": {"loss.learn_temperature": False},
    "FLIP patch dropout 0.5": {"model_overrides.vision.patch_dropout": 0.5},
    "caption-safe flip + colour jitter, tag dropout 0.3 + shuffle": {
        "model_overrides.preprocess.train_hflip": 0.5,
        "model_overrides.preprocess.train_color_jitter": [0.2, 0.2, 0.2],
        "data.tag_dropout": 0.3,
        "data.tag_shuffle": True,
    },
}


def val_retrieval(model, data) -> float:
    """Text→image R@1 over the training sources' val splits (first caption per image)."""
    import numpy as np

    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.features import encode_images, encode_texts
    from clipforge.eval.retrieval import retrieval_metrics
    from clipforge.tokenizer import get_tokenizer

    features, texts = [], []
    for part in data.plan["train"]:
        encoded = encode_images(
            model, open_eval_dataset(data.roots[part["source"]], split="val"), progress=False
        )
        features.append(encoded.features)
        texts += [caps[0] for caps in encoded.captions]
    text_features = encode_texts(model, get_tokenizer(model), texts, progress=False)
    metrics = retrieval_metrics(np.concatenate(features), text_features, np.arange(len(texts)))
    return float(metrics["text_to_image_R@1"])


def run(steps: int, seeds: list[int], out: Path) -> dict:
    from clipforge.checkpoint import load_checkpoint
    from clipforge.demo import preset_path
    from clipforge.demo_data import prepare
    from clipforge.train import resolve_train_config, train

    data = prepare(progress=False)
    val_set = data.eval_set("style_shift_val", section="validation")
    results = {"steps": steps, "seeds": seeds, "runs": []}
    for name, overrides in RECIPES.items():
        for seed in seeds:
            config = resolve_train_config(preset_path("demo"), {
                "data.train": data.train_specs(), "steps": steps, "seed": seed, "run.output_dir": str(out / "runs"),
                "run.name": f"{len(results['runs']):02d}", "run.progress": False, "run.eval_every": 0,
                "run.time_limit_s": 0, "run.checkpoint_every": 10**6, **overrides,
            })  # fmt: skip
            started = time.perf_counter()
            summary = train(config)
            seconds = time.perf_counter() - started
            model = load_checkpoint(summary.model_path)
            score = val_set.evaluate(model, ("ensemble",))["ensemble"].mean_per_class.value
            record = {"recipe": name, "overrides": overrides, "seed": seed, "train_s": seconds,
                      "pairs_per_s": summary.samples_per_s, "final_loss": summary.final_loss,
                      "zeroshot_val": score, "retrieval_val_t2i_r1": val_retrieval(model, data)}  # fmt: skip
            results["runs"].append(record)
            print(json.dumps(record), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def render(results: dict) -> str:
    from clipforge.eval.intervals import seed_interval

    lines = [
        "| recipe | config keys | zero-shot, OpenMoji val (mean per-class, chance 0.111) | t→i R@1, val | "
        "train s | pairs/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, overrides in RECIPES.items():
        runs = [r for r in results["runs"] if r["recipe"] == name]
        if not runs:
            continue
        zs = seed_interval([r["zeroshot_val"] for r in runs])
        r1 = seed_interval([r["retrieval_val_t2i_r1"] for r in runs])
        keys = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in overrides.items()) or "—"
        seconds = sum(r["train_s"] for r in runs) / len(runs)
        speed = sum(r["pairs_per_s"] for r in runs) / len(runs)
        lines.append(f"| {name} | {keys} | {zs.mean:.3f} ± {zs.std:.3f} | {r1.mean:.3f} ± {r1.std:.3f} | "
                     f"{seconds:.0f} | {speed:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("docs/results/recipes"))
    parser.add_argument("--from-results", type=Path, default=None)
    args = parser.parse_args()
    if args.from_results:
        results = json.loads(args.from_results.read_text())
        out = args.from_results.parent
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        results = run(args.steps, args.seeds, args.out)
        out = args.out
    table = render(results)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

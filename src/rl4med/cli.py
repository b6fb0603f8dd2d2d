"""The ``rl4med`` command line: sample from a trained model, score images, list the prompts.

Every subcommand reuses the workflow's own functions (generation, the classifier's predictions,
r_A and APR); a bad prompt, a missing model or an unreadable image ends with one line naming it
(exit code 1), bad arguments with argparse's usage message (exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROMPT_HELP = (
    "a prompt of either template ('A dermoscopic image with melanoma showing hairs and ruler', "
    "'a dermoscopic image with melanoma (MEL) showing hair, ruler') or one of the 32 slugs "
    "(`rl4med prompts`); a model is always given the wording it was trained on"
)


def cmd_prompts(args: argparse.Namespace) -> None:
    from rl4med.prompts import all_prompts

    print("slug\tprompt\tC(prompt)")
    for p in all_prompts():
        print(f"{p.slug}\t{p.render(args.template)}\t{''.join(map(str, p.labels))}")


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from rl4med.evaluation.samples import SamplingSettings, generate_samples, read_samples
    from rl4med.figures import save_grid
    from rl4med.models.sd import inference_dtype, load_sd
    from rl4med.prompts import to_prompt
    from rl4med.runtime import select_device

    prompt = to_prompt(args.prompt)
    if args.n < 1:
        raise ValueError(f"-n must be at least 1, got {args.n}")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: the grid is written as PNG; give a .png path")
    device = select_device(args.device)
    sd = load_sd(args.model, device, inference_dtype(args.dtype, device))
    folder = args.samples_dir or args.out.with_suffix("")
    settings = SamplingSettings(
        args.n, args.steps, args.guidance, seed=args.seed, eta=args.eta, batch_size=args.batch_size
    )
    generate_samples(sd, prompt, settings, folder)
    images, _ = read_samples(folder)
    cols = min(args.n, 8)
    rows = -(-args.n // cols)
    blank = np.full_like(images[0], 255)
    padded = np.stack(list(images) + [blank] * (rows * cols - args.n))
    labels = [prompt.slug] + [""] * (rows - 1)
    save_grid(padded, rows=rows, labels=labels, path=args.out, max_cols=cols)
    text = sd.prompt_texts([prompt])[0]  # the wording the model was trained on
    print(f"{args.n} samples of {prompt.slug!r} ({text}): {folder}/, grid {args.out}")


def cmd_score(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from rl4med.attributes import ATTRIBUTES
    from rl4med.data.images import load_image
    from rl4med.ddpo.reward import AttributeReward
    from rl4med.evaluation.apr import apr_indicators
    from rl4med.models.classifier import load_classifier
    from rl4med.prompts import to_prompt
    from rl4med.runtime import select_device

    clf = load_classifier(args.classifier, select_device(args.device))
    size = clf.spec.image_size
    images = np.stack([load_image(str(p), size) for p in args.images])
    # a classifier without some heads (the authors' H4) leaves their columns empty
    table = pd.DataFrame(clf.predict(images), columns=list(ATTRIBUTES)).astype("Int64")
    table.insert(0, "image", [str(p) for p in args.images])
    if args.prompt:
        prompt = to_prompt(args.prompt)
        scored = AttributeReward(clf, require_all_heads=False)(images, [prompt] * len(images))
        table["r_A"] = scored.reward.round(4)
        for col, hits in apr_indicators(scored.matches).items():
            table[col] = pd.array(hits).astype("Int64")
    print(table.to_csv(sep="\t", index=False), end="")
    if args.prompt:

        def rate(col: str) -> str:
            if table[col].isna().any():
                return f"{col} n/a (no {', '.join(clf.spec.absent)} head)"
            return f"{col} {table[col].mean():.4f} ({int(table[col].sum())}/{len(table)})"

        r_a = "n/a" if table["r_A"].isna().any() else f"{table['r_A'].mean():.4f}"
        print(
            f"# prompt {prompt.slug}: C = {''.join(map(str, prompt.labels))}, "
            f"mean r_A {r_a}, {rate('apr').replace('apr', 'APR', 1)}, {rate('exact6')}"
        )


def cmd_label_sheet(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from rl4med.attributes import ARTIFACTS
    from rl4med.evaluation.panel import LABEL_COLUMNS, image_digest, pick_for_labels
    from rl4med.evaluation.samples import read_images, sample_index
    from rl4med.figures import save_captioned_grid
    from rl4med.io import write_table

    run = args.run_dir
    scores = {}
    for model in ("sd", "sd_rl"):
        path = run / f"results/evaluation/scores_{model}.tsv"
        if not path.is_file():
            raise ValueError(f"{path}: missing; label sheets need a finished run")
        scores[model] = pd.read_csv(path, sep="\t")
    judges = [c for c in dict.fromkeys(scores["sd"]["classifier"]) if c != "reward"]
    if len(judges) < 2:
        raise ValueError(f"{run}: the run has {len(judges)} judge(s); a panel needs 2 or more")
    picked = pick_for_labels(scores, judges, args.pairs)
    # shuffled, so that the person labelling cannot tell SD from SD+RL by the order
    picked = picked.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    paths = []
    for model, prompt, sample in picked[["model", "prompt", "sample"]].itertuples(index=False):
        index = sample_index([run / "results/samples" / model / prompt])
        path = index.loc[index["sample"] == sample, "path"].iloc[0]
        paths.append(str(Path(path).relative_to(run)))
    table = picked.assign(
        sample_path=paths,
        note="",
        image_sha256=[image_digest(run / p) for p in paths],
        **{a: "" for a in ARTIFACTS},
    )
    write_table(table[LABEL_COLUMNS], args.out)
    args.sheets.mkdir(parents=True, exist_ok=True)
    per_sheet = args.cols * args.rows
    for start in range(0, len(table), per_sheet):
        part = table.iloc[start : start + per_sheet]
        images = read_images([run / p for p in part["sample_path"]])
        captions = [[f"row {start + k + 2}"] for k in range(len(part))]
        sheet = args.sheets / f"sheet_{start // per_sheet + 1:02d}.png"
        save_captioned_grid(np.asarray(images), captions, sheet, cols=args.cols, scale=args.scale)
    print(
        f"{len(table)} samples to label: {args.out} (rows as numbered on the sheets in "
        f"{args.sheets}/); fill hair, gel_bubbles, ink, ruler with 1 or 0"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rl4med", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prompts",
        help="list the 32 prompts, their slugs and C(prompt)",
        description="The 32 evaluation prompts (2 diseases x 16 artifact sets).",
    )
    p.add_argument(
        "--template",
        choices=["paper", "authors"],
        default="paper",
        help="wording: the paper's Figure 1 (default) or the authors' code (prompts.template)",
    )
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser(
        "sample",
        help="sample a prompt from a trained model",
        description="Sample a prompt from a diffusers model folder (results/"
        "models/sd or sd_rl, or SD v1.5): individual PNGs and a grid. Seeds are "
        "those of the workflow's generate rule, so the same --seed gives the "
        "workflow's samples.",
    )
    p.add_argument("--model", required=True, type=Path, help="diffusers model folder")
    p.add_argument("--prompt", required=True, help=PROMPT_HELP)
    p.add_argument("-n", type=int, default=16, help="number of samples (16)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="grid PNG (grid.png)")
    p.add_argument(
        "--samples-dir",
        type=Path,
        default=None,
        help="folder of the individual PNGs and index.csv (default: --out without .png)",
    )
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (20)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale (3.0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"])
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "score",
        help="6-attribute predictions, r_A, APR and exact6 of images",
        description="Predict the 6 attributes of images with a classifier folder "
        "(results/models/classifier_reward or _judge); with --prompt also per image r_A, "
        "apr (the 4 artifacts as prompted: APR's indicator, paper eq. 3) and exact6 (all 6 "
        "attributes as prompted), and the set's means. Tab-separated to stdout.",
    )
    p.add_argument("--classifier", required=True, type=Path, help="classifier folder")
    p.add_argument("--prompt", default=None, help=PROMPT_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "label-sheet",
        help="pick samples the judges disagree on, for labelling by eye",
        description="From a finished run with a judge panel, pick paired samples (SD and SD+RL "
        "from the same noise) on which the judges disagree most, write a labels TSV to fill "
        "(hair, gel_bubbles, ink, ruler: 1 or 0) and contact sheets of the samples enlarged, "
        "numbered by their TSV row, in shuffled order and without model, prompt or verdicts, so "
        "that labelling is blind.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="the workflow folder of the run")
    p.add_argument("--pairs", type=int, default=64, help="paired samples (64: 128 images)")
    p.add_argument("--out", type=Path, default=Path("labels-by-eye.tsv"))
    p.add_argument("--sheets", type=Path, default=Path("label-sheets"))
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--scale", type=int, default=6, help="enlargement of each sample (6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    p.set_defaults(func=cmd_label_sheet)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:  # bad input: the message names it
        print(f"rl4med {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

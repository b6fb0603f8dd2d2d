"""Download every weight file a configuration names (SD v1.5, Inception for FID, AlexNet for
LPIPS, timm or torchvision ImageNet weights) on a machine with internet. Not a workflow rule:
the workflow never downloads. The authors' published weights (config ``published``) are in a
Google Drive folder, not on a model hub: they are listed and checked, and a missing one is
reported with where to download it by hand (exit code 1). Usage:

    python scripts/fetch_weights.py --configfile config/isic2019-sd15.yaml [--dry-run]
    python scripts/fetch_weights.py \
        --configfile config/isic2019-sd15.yaml config/isic2019-published.yaml
"""

import argparse
import logging
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from rl4med.weights import (  # noqa: E402
    ManualDownloadError,
    allow_downloads,
    fetch,
    overlay_configs,
    required_weights,
)


def main() -> int:
    # first, before anything imports huggingface_hub (it reads HF_HUB_OFFLINE once): the
    # workflow's offline mode (container, Makefile) must not stop the one step that downloads
    allow_downloads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configfile", required=True, type=Path, nargs="+", help="config, then overlays"
    )
    parser.add_argument("--dry-run", action="store_true", help="list, do not download")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = overlay_configs([yaml.safe_load(p.read_text()) for p in args.configfile])
    weights = required_weights(config)
    for w in weights:
        state = "present" if Path(w.destination).exists() else "missing"
        print(f"{w.key}: {w.destination} <- {w.source} ({state})")
    if args.dry_run:
        return 0
    by_hand = []
    for w in weights:
        try:
            fetch(w)
        except ManualDownloadError as err:
            by_hand.append(str(err))
    for message in by_hand:
        print(f"by hand: {message}", file=sys.stderr)
    return 1 if by_hand else 0


if __name__ == "__main__":
    raise SystemExit(main())

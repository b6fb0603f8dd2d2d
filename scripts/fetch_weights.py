"""Download every weight file a configuration names (SD v1.5, Inception for FID, AlexNet for
LPIPS, timm ImageNet weights) on a machine with internet. Not a workflow rule: the workflow
never downloads. Usage:

    python scripts/fetch_weights.py --configfile config/isic2019-sd15.yaml [--dry-run]
"""

import argparse
import logging
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from rl4med.weights import allow_downloads, fetch, required_weights  # noqa: E402


def main() -> int:
    # first, before anything imports huggingface_hub (it reads HF_HUB_OFFLINE once): the
    # workflow's offline mode (container, Makefile) must not stop the one step that downloads
    allow_downloads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true", help="list, do not download")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    weights = required_weights(yaml.safe_load(args.configfile.read_text()))
    for w in weights:
        state = "present" if Path(w.destination).exists() else "missing"
        print(f"{w.key}: {w.destination} <- {w.source} ({state})")
    if not args.dry_run:
        for w in weights:
            fetch(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m rl4med.showcase``: write the showcase document from a finished run."""

from rl4med.showcase.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

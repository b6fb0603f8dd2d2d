"""Start-up checks of a cluster run that need nothing but the standard library.

rules/common.smk imports this on the host, where only Snakemake may be installed.
"""

from __future__ import annotations

import re

# what brings the host to the container's versions (docs/cluster.md)
SNAKEMAKE_FIX = (
    "pip install -c containers/constraints.txt snakemake snakemake-executor-plugin-slurm"
)


def _canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_version(constraints: str, package: str) -> str | None:
    """The version a pip constraints text pins ``package`` to (``name==version``), else None."""
    want = _canonical(package)
    for line in constraints.splitlines():
        name, sep, version = line.split("#", 1)[0].partition("==")
        if sep and _canonical(name.strip()) == want:
            return version.strip()
    return None


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``9.27.1`` or ``9.27.1.post1``."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def snakemake_mismatch(host: str, constraints: str) -> str | None:
    """Why the host's Snakemake cannot drive the container's, or None when they agree.

    Each job's ``script:`` preamble unpickles the host's ``snakemake.script.Snakemake`` object
    with the Snakemake inside the container: another minor version can fail every job with an
    AttributeError or ModuleNotFoundError, after the job has waited in the queue. Same
    major.minor is what Snakemake keeps compatible, so patch versions may differ.
    """
    pinned = pinned_version(constraints, "snakemake")
    if pinned is None:
        return "containers/constraints.txt pins no snakemake version: cannot check the host's"
    if major_minor(host) == major_minor(pinned):
        return None
    return (
        f"This Snakemake is {host}, the container's is {pinned} (containers/constraints.txt). "
        "Each rule's script runs inside the container and reads what the host's Snakemake "
        "wrote, so their major.minor versions must agree. Install the container's versions on "
        f"the host: {SNAKEMAKE_FIX}"
    )

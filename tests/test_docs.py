"""The documentation: README.md is a front door (at most 250 lines) that reaches every page of
docs/, no relative link or #anchor points nowhere, and docs/configuration.md's key reference is
the one scripts/config_reference.py generates from the schema."""

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))  # docs/results/ is written by tools
SCHEMA = REPO / "schemas" / "config.schema.yaml"
REFERENCE = REPO / "docs" / "configuration.md"
MAX_README_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _config_reference():
    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "scripts" / "config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_code(text: str) -> str:
    """The text with fenced blocks removed and code spans blanked (their brackets are no links)."""
    return _CODE_SPAN.sub("``", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: link and code markup dropped, lower case, punctuation
    removed (hyphens and underscores stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #anchor the headings of a markdown file give (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(path: Path) -> list[str]:
    """The targets of the markdown links and images of a file, external ones left out."""
    targets = _LINK.findall(_without_code(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def _resolve(source: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return (source if not path else (source.parent / path).resolve()), anchor


def test_slugs_are_githubs():
    assert _slug("Quick start (a fresh machine)") == "quick-start-a-fresh-machine"
    assert _slug("6. Numbers go in an overlay file, not `--config`") == (
        "6-numbers-go-in-an-overlay-file-not---config"
    )
    assert _slug("The demo's stage i length and guidance scale") == (
        "the-demos-stage-i-length-and-guidance-scale"
    )
    assert _slug("Stage ii: DDPO") == "stage-ii-ddpo"


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, at most {MAX_README_LINES}: move the detail into "
        "docs/ and link it"
    )


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_exist(page):
    broken = []
    for target in links(page):
        path, anchor = _resolve(page, target)
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading gives #{anchor})")
    assert not broken, f"{page.relative_to(REPO)}: dead links: {broken}"


def test_every_doc_is_reachable_from_the_readme():
    reached, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in links(page):
            path, _ = _resolve(page, target)
            if path.suffix == ".md" and path.is_file() and path.is_relative_to(REPO):
                todo.append(path)
    missing = [str(p.relative_to(REPO)) for p in DOCS if p.resolve() not in reached]
    assert not missing, f"not reachable from README.md through links: {missing}"


def test_the_configuration_reference_is_generated_from_the_schema():
    ref = _config_reference()
    block = ref.render(SCHEMA)
    committed = REFERENCE.read_text()
    assert ref.splice(committed, block, str(REFERENCE)) == committed, (
        f"{REFERENCE.relative_to(REPO)}'s key reference differs from the schema's: run "
        f"`{ref.COMMAND}`"
    )


def test_the_reference_names_every_key_of_the_schema():
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    names = set()

    def collect(node):
        if isinstance(node, dict):
            names.update(
                node.get("properties", {}) if isinstance(node.get("properties"), dict) else {}
            )
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    block = _config_reference().render(SCHEMA)
    keys = set(re.findall(r"^\| `([^`]+)` \|", block, re.M))
    last = {k.rsplit(".", 1)[-1].removesuffix("[]") for k in keys}
    assert names <= last, f"schema keys missing from the reference: {sorted(names - last)}"
    for path in (
        "ddpo.rows_per_step",
        "classifier.<name>.epochs",
        "resources.<rule>.gpus",
        "data.synthetic.cooccurrence[].p",
        "evaluation.fid.uint8_wrap",
    ):
        assert path in keys, path

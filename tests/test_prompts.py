from pathlib import Path

import pytest

from rl4med.attributes import ARTIFACTS, ATTRIBUTES, attribute_index
from rl4med.prompts import (
    Prompt,
    all_prompts,
    all_slugs,
    condition_vector,
    parse_prompt,
    prompt_from_labels,
    prompt_from_slug,
    to_prompt,
)


def test_attribute_order_is_the_papers_six_heads():
    assert ATTRIBUTES == ("MEL", "NV", "hair", "gel_bubbles", "ink", "ruler")
    assert attribute_index("ink") == 4
    with pytest.raises(ValueError, match="unknown attribute 'gel'"):
        attribute_index("gel")


def test_32_unique_prompts_and_slugs():
    prompts = all_prompts()
    assert len(prompts) == 32
    assert len({p.text for p in prompts}) == 32
    assert len(set(all_slugs())) == 32
    assert sum(p.disease == "MEL" for p in prompts) == 16
    # every artifact subset appears once per disease
    assert {p.artifacts for p in prompts if p.disease == "NV"} == {
        p.artifacts for p in prompts if p.disease == "MEL"
    }


@pytest.mark.parametrize(
    ("prompt", "text", "slug", "labels"),
    [
        (Prompt("MEL"), "A dermoscopic image with melanoma", "mel__none", (1, 0, 0, 0, 0, 0)),
        (
            Prompt("NV", ("ink",)),
            "A dermoscopic image with melanocytic nevus showing ink",
            "nv__ink",
            (0, 1, 0, 0, 1, 0),
        ),
        (
            Prompt("NV", ("ruler", "hair")),
            "A dermoscopic image with melanocytic nevus showing hairs and ruler",
            "nv__hair-ruler",
            (0, 1, 1, 0, 0, 1),
        ),
        (
            Prompt("MEL", ("hair", "gel_bubbles", "ruler")),
            "A dermoscopic image with melanoma showing hairs, gel bubbles and ruler",
            "mel__hair-gel-ruler",
            (1, 0, 1, 1, 0, 1),
        ),
        (
            Prompt("MEL", ARTIFACTS),
            "A dermoscopic image with melanoma showing hairs, gel bubbles, ink and ruler",
            "mel__hair-gel-ink-ruler",
            (1, 0, 1, 1, 1, 1),
        ),
    ],
)
def test_text_slug_and_condition_vector(prompt, text, slug, labels):
    assert prompt.text == text
    assert prompt.slug == slug
    assert condition_vector(text) == labels
    assert condition_vector(slug) == labels


def test_round_trips_for_all_prompts():
    for p in all_prompts():
        assert parse_prompt(p.text) == p
        assert prompt_from_slug(p.slug) == p
        assert prompt_from_labels(p.labels) == p
        assert to_prompt(p.text) == to_prompt(p.slug) == p


def test_artifact_order_is_canonical():
    assert Prompt("MEL", ("ruler", "ink")) == Prompt("MEL", ("ink", "ruler"))
    assert Prompt("MEL", ("ruler", "ink")).slug == "mel__ink-ruler"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Prompt("BCC"), "unknown disease 'BCC'"),
        (lambda: Prompt("MEL", ("dark_corner",)), "unknown artifact"),
        (
            lambda: parse_prompt("A dermoscopic image with basal cell carcinoma"),
            "unknown disease 'basal cell carcinoma'",
        ),
        (
            lambda: parse_prompt("A dermoscopic image with melanoma showing tattoos"),
            "unknown artifact 'tattoos'",
        ),
        (
            lambda: parse_prompt("A dermoscopic image with melanoma showing ruler and hairs"),
            "did you mean 'A dermoscopic image with melanoma showing hairs and ruler'",
        ),
        (lambda: parse_prompt("a photo of a cat"), "does not follow the template"),
        (lambda: prompt_from_slug("mel__hair-tattoo"), "unknown artifact 'tattoo'"),
        (lambda: prompt_from_slug("bcc__none"), "unknown prompt slug"),
        (lambda: prompt_from_labels([1, 1, 0, 0, 0, 0]), "exactly one of MEL, NV"),
        (lambda: prompt_from_labels([1, 0, 0]), "6 values"),
        (lambda: Prompt("MEL").render("clip"), "prompt template 'clip'"),
        (
            lambda: to_prompt("a dermoscopic image with melanoma (MEL) showing ink, hair"),
            "not one of the authors' 32 texts",
        ),
    ],
)
def test_bad_prompts_name_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


AUTHORS_PROMPTS = Path(__file__).parents[1] / "resources/isic2019-official-splits/isic_prompts.txt"


def test_authors_template_is_their_32_texts_exactly():
    """Their isic_prompts.txt, shipped with the splits: the same 32 conditions, their wording."""
    theirs = AUTHORS_PROMPTS.read_text().splitlines()
    ours = [p.render("authors") for p in all_prompts()]
    assert len(theirs) == 32 and sorted(theirs) == sorted(ours)
    assert "a dermoscopic image with melanoma (MEL) showing hair, gel bubble, ruler, ink" in ours
    assert "a dermoscopic image with melanocytic nevus (NV) with no visible artifacts" in ours
    for text in theirs:  # parsed back to the same condition, so slugs are unchanged
        prompt = to_prompt(text)
        assert prompt.render("authors") == text and prompt_from_slug(prompt.slug) == prompt
    assert to_prompt("a dermoscopic image with melanoma (MEL) showing ruler, ink").slug == (
        "mel__ink-ruler"
    )

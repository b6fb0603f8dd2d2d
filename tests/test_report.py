"""The report's summary page: the headline, the chart of APR per prompt that opens it, Table 3
one row per measure, and (in headless Chromium) every table within a 1280 px wide page."""

import base64
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rl4med.attributes import ATTRIBUTES
from rl4med.data.manifest import table1
from rl4med.evaluation.apr import table2, table3
from rl4med.evaluation.augmentation import table4
from rl4med.evaluation.frechet import FID_LABEL, UINT8_WRAP_SUFFIX
from rl4med.evaluation.panel import panel_table
from rl4med.evaluation.perceptual import LPIPS_RANDOM_LABEL
from rl4med.evaluation.report import (
    apr_per_prompt_chart,
    flatten_config,
    panel_headline,
    summary_headline,
    summary_html,
)
from rl4med.evaluation.storage import CENTRE_CROP_LABEL
from rl4med.prompts import all_prompts

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH = 1280
# the longest FD/FID name a config can give (Inception, authors' wrap, JPEG q75, centre crop)
FID_NAME = (
    f"{FID_LABEL}{UINT8_WRAP_SUFFIX}, samples and real images as JPEG q75 (authors' storage)"
    f"{CENTRE_CROP_LABEL}"
)
JUDGES = {"judge": "resnet18", "cnn": "rl4med/smallcnn", "regnet": "regnetx_004"}
CHANGES = {"reward": 0.2, "judge": 0.16, "cnn": 0.05, "regnet": -0.03}


def change_rows() -> pd.DataFrame:
    """apr_change.tsv of a run whose judges see CHANGES (SD at 0.5)."""
    metrics = ("APR", "exact6", "r_A", *(f"match_{a}" for a in ATTRIBUTES))
    return pd.DataFrame(
        [
            {
                "classifier": name,
                "metric": metric,
                "SD": 0.5,
                "SD+RL": 0.5 + delta,
                "change": delta,
                "ci_low": delta - 0.02,
                "ci_high": delta + 0.02,
                "n": 512,
            }
            for name, delta in CHANGES.items()
            for metric in metrics
        ]
    )


def per_prompt_rows(seed: int = 0) -> pd.DataFrame:
    """apr_per_prompt.tsv: APR and exact6 of every prompt, model and classifier."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("sd", "sd_rl"):
        for clf in CHANGES:
            for p in all_prompts():
                apr = rng.integers(0, 17) / 16
                rows.append(
                    {
                        "model": model,
                        "classifier": clf,
                        "prompt": p.slug,
                        "APR": apr,
                        "exact6": apr / 2,
                        "n": 16,
                    }
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tables():
    """The summary page's tables as the workflow's functions make them, with the longest column
    names a config gives, and the default configuration."""
    rng = np.random.default_rng(0)
    manifest = pd.DataFrame(rng.integers(0, 2, (300, len(ATTRIBUTES))), columns=list(ATTRIBUTES))
    manifest["split"] = rng.choice(["train", "val", "test"], len(manifest))
    per_prompt = per_prompt_rows()
    scores = {
        m: pd.DataFrame(
            {
                "classifier": ["reward", "judge"] * 20,
                "apr": rng.integers(0, 2, 40),
                "exact6": 0,
                "r_A": rng.random(40),
            }
        )
        for m in ("sd", "sd_rl")
    }
    fd = {
        m: pd.DataFrame({"group": ["all"], "metric": [FID_NAME], "value": [120.5]}) for m in scores
    }
    lpips_name = LPIPS_RANDOM_LABEL.format(net="alex") + CENTRE_CROP_LABEL
    lpips = {
        m: pd.DataFrame({"metric": [lpips_name], "n_pairs": [3], "lpips": [0.4]}) for m in scores
    }

    def metrics(f1):
        return pd.DataFrame({"attribute": list(ATTRIBUTES), "f1": f1, "accuracy": 0.9})

    runs = {
        (s, seed): metrics(0.5 + seed / 10)
        for s in ("real", "real_sd", "real_sd_rl")
        for seed in (0, 1)
    }
    change = change_rows()
    test = pd.DataFrame({"attribute": ["MEL", "hair", "exact_match"], "accuracy": [0.99, 0.9, 0.8]})
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    return {
        "table1": table1(manifest),
        "table2": table2(per_prompt, manifest[manifest["split"] == "train"]),
        "table3": table3(scores, fd, lpips, n_boot=50),
        "table4": table4(runs),
        "apr_change": change,
        "judge_panel": panel_table(change, JUDGES, "resnet10t", {k: test for k in JUDGES}),
        "config": flatten_config(cfg),
        "per_prompt": per_prompt,
    }


@pytest.fixture(scope="module")
def page(tables, tmp_path_factory):
    out = tmp_path_factory.mktemp("summary")
    chart = out / "apr_per_prompt.png"
    apr_per_prompt_chart(tables["per_prompt"], chart)
    summary_html(tables, out / "summary.html", chart=chart)
    return out / "summary.html", chart


def test_the_headline_gives_the_panels_smallest_gain_and_the_papers_judge_beside_it(tables):
    text = summary_headline(tables["apr_change"], tables["judge_panel"])
    assert text.startswith("SD -> SD+RL on the same noise")
    assert panel_headline(tables["judge_panel"]) in text
    assert "-3.0 points [-5.0, -1.0] (judge regnet)" in text
    assert text.endswith(
        "the paper's judge (judge): APR 50.0% -> 66.0%, +16.0 points [+14.0, +18.0]."
    )
    alone = summary_headline(tables["apr_change"])
    assert "panel" not in alone and alone.endswith("+16.0 points [+14.0, +18.0].")
    with pytest.raises(ValueError, match="no APR change of the paper's judge 'judge'"):
        summary_headline(tables["apr_change"].query("classifier != 'judge'"))


def test_the_chart_plots_the_papers_judges_apr_of_every_prompt_for_both_models(tables, tmp_path):
    per_prompt = tables["per_prompt"]
    shown = apr_per_prompt_chart(per_prompt, tmp_path / "chart.png")
    assert shown["prompt"].tolist() == [p.slug for p in all_prompts()]
    judge = per_prompt[per_prompt["classifier"] == "judge"].set_index(["model", "prompt"])["APR"]
    assert shown.set_index("prompt")["SD+RL"].to_dict() == (100 * judge["sd_rl"]).to_dict()
    assert shown.set_index("prompt")["SD"].to_dict() == (100 * judge["sd"]).to_dict()
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows of classifier 'judge'"):
        apr_per_prompt_chart(per_prompt[per_prompt["classifier"] != "judge"], tmp_path / "x.png")


def test_the_page_opens_with_the_headline_and_the_chart_then_the_tables(tables, page):
    path, chart = page
    text = path.read_text()
    body = text[text.index("<body>") + len("<body>") :]
    # the title, the headline sentence, the chart (embedded: the page stands alone), the tables
    assert re.match(r"<h1>[^<]*</h1><p class='headline'><b>Headline.</b> ", body)
    headline = summary_headline(tables["apr_change"], tables["judge_panel"])
    assert body.index(html.escape(headline)) < body.index("<figure")
    src = re.search(r"<img [^>]*src='data:image/png;base64,([^']+)'", body)
    assert base64.b64decode(src[1]) == chart.read_bytes()
    assert body.index("</figure>") < body.index("<table")
    titles = re.findall(r"<h2>(.*?)</h2>", body)
    assert [t.split(":")[0] for t in titles] == [
        "Judge panel",
        "Table 1 (ours)",
        "Table 1 (paper)",
        "Table 2",
        "Table 3",
        "SD -&gt; SD+RL on the same noise (paired)",
        "Table 4",
        "Configuration of this run",
    ]
    # Table 3 one row per measure, SD and SD+RL its columns, the same numbers
    t3 = tables["table3"].set_index("model")
    part = body[body.index("<h2>Table 3") : body.index("<h2>SD -&gt; SD+RL")]
    assert re.search(r"<th>measure</th>\s*<th>SD</th>\s*<th>SD\+RL</th>", part)
    for measure in ("APR_judge", "paper_APR", FID_NAME):
        sd, rl = (t3.loc[m, measure] for m in ("SD", "SD+RL"))
        cells = [f"{v:.3f}" if isinstance(v, float) else v for v in (sd, rl)]
        name = measure
        assert re.search(
            rf"<td>{re.escape(name)}</td>\s*<td>{cells[0]}</td>\s*<td>{cells[1]}</td>", part
        ), measure
    assert f"<td>{t3.loc['SD', 'APR_judge_ci']}</td>" in part
    # long headers may break after "_"
    assert "paper_<wbr>APR_<wbr>SD+RL" in body


def chromium_layout(path: Path, width: int = WIDTH) -> dict:
    """Load ``path`` in headless Chromium at ``width`` px and measure it: the viewport and page
    widths, each table's width beside its container's, and the page's first elements."""
    probe = """<script>window.addEventListener('load', () => {
      const out = document.createElement('pre');
      out.id = 'layout';
      out.textContent = JSON.stringify({
        inner: window.innerWidth,
        scroll: document.documentElement.scrollWidth,
        tables: [...document.querySelectorAll('table')].map(t => ({
          before: (t.previousElementSibling || {}).textContent,
          width: t.getBoundingClientRect().width, room: t.parentElement.clientWidth})),
        first: [...document.body.children].slice(0, 3).map(e => ({
          tag: e.tagName, cls: e.className, text: e.textContent.slice(0, 400),
          img: e.querySelector('img') && e.querySelector('img').naturalWidth,
          bottom: e.getBoundingClientRect().bottom})),
        firstTable: document.querySelector('table').getBoundingClientRect().top});
      document.body.appendChild(out);});</script>"""
    # a copy elsewhere, the run's folder left as it was: the page embeds its chart
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / path.name
        probed.write_text(path.read_text().replace("</body>", f"{probe}</body>"))
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                f"--window-size={width},2000",
                "--dump-dom",
                probed.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0 and "Uncaught" not in proc.stderr, proc.stderr[-2000:]
    found = re.search(r'<pre id="layout">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    return json.loads(html.unescape(found[1]))


def check_summary_layout(path: Path) -> None:
    """The summary page at 1280 px: no sideways scroll, each table within its container, and it
    opens with the headline sentence, then the chart of APR per prompt (loaded)."""
    layout = chromium_layout(path)
    assert layout["inner"] == WIDTH, layout
    assert layout["scroll"] <= layout["inner"], layout
    for table in layout["tables"]:
        assert table["width"] <= table["room"] + 0.5, table
    title, headline, chart = layout["first"]
    assert title["tag"] == "H1"
    assert headline["tag"] == "P" and headline["cls"] == "headline", headline
    assert headline["text"].startswith("Headline. SD -> SD+RL on the same noise"), headline
    assert "smallest gain over the panel" in headline["text"], headline
    assert "the paper's judge (judge): APR " in headline["text"], headline
    assert chart["tag"] == "FIGURE" and chart["img"] > 300, chart
    assert layout["firstTable"] >= chart["bottom"], layout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_every_table_of_the_summary_page_fits_a_1280_px_page_in_chromium(page):
    check_summary_layout(page[0])

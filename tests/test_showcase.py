"""The showcase document's readers: job times from logs, per-artifact rates, missing outputs."""

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rl4med.io import STEP_DONE, run_step
from rl4med.showcase import artifact_rates, main, markdown_table, rule_times


def test_run_step_logs_its_time_and_rule_and_rule_times_sums_them(tmp_path):
    for name, rule in (("a", "generate"), ("b", "generate"), ("c", "ddpo")):
        run_step(lambda: None, tmp_path / "logs" / f"{name}.log", rule=rule)
        logging.getLogger().handlers.clear()
    text = (tmp_path / "logs/a.log").read_text()
    assert f"{STEP_DONE} " in text and "(rule generate)" in text
    times = rule_times(tmp_path / "logs").set_index("rule")
    assert times.loc["generate", "jobs"] == 2 and times.loc["ddpo", "jobs"] == 1
    # process age: at least the time this test process has lived, so > 0
    assert (times["job_seconds"] > 0).all()
    assert times.loc["generate", "longest"] <= times.loc["generate", "job_seconds"]


def test_a_step_that_ends_its_process_still_runs_threads_exit_handlers_and_logs(tmp_path):
    """end=True skips only the interpreter's teardown: a non-daemon thread finishes, atexit
    handlers run, the log is complete, nothing after run_step runs, and the exit code is 0."""
    src = Path(__file__).resolve().parents[1] / "src"
    script = textwrap.dedent(
        f"""
        import atexit, sys, threading, time
        sys.path.insert(0, {str(src)!r})
        from pathlib import Path
        from rl4med.io import run_step
        out = Path({str(tmp_path)!r})
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        def slow():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        def step():
            threading.Thread(target=slow).start()
            print("stdout line", end="")  # unflushed: a pipe is block-buffered
        run_step(step, out / "job.log", rule="generate", end=True)
        (out / "after").write_text("must not run")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stdout line"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after").exists()
    assert f"{STEP_DONE} " in (tmp_path / "job.log").read_text()


def test_rule_times_names_the_folder_without_finished_jobs(tmp_path):
    (tmp_path / "x.log").write_text("started\n")
    with pytest.raises(ValueError, match=f"{tmp_path}: no job log has a '{STEP_DONE}' line"):
        rule_times(tmp_path)


def test_artifact_rates_split_prompted_from_unprompted():
    # mel__gel asks for gel bubbles; nv__none asks for nothing
    rows = []
    for prompt, gel_match in (("mel__gel", [1, 1, 0, 0]), ("nv__none", [1, 1, 1, 0])):
        for i, m in enumerate(gel_match):
            rows.append(
                {
                    "classifier": "judge",
                    "prompt": prompt,
                    "sample": i,
                    **{f"match_{a}": 1.0 for a in ("hair", "ink", "ruler")},
                    "match_gel_bubbles": float(m),
                }
            )
    rows.append({**rows[0], "classifier": "reward", "match_gel_bubbles": 0.0})
    rates = artifact_rates(pd.DataFrame(rows)).set_index("artifact")
    assert rates.loc["gel_bubbles", "drawn_when_prompted"] == 0.5
    assert rates.loc["gel_bubbles", "left_out_when_not"] == 0.75
    assert rates.loc["gel_bubbles", "n_prompted"] == 4
    assert np.isnan(rates.loc["ink", "drawn_when_prompted"])  # no prompt asks for ink
    assert rates.loc["ink", "left_out_when_not"] == 1.0


def test_markdown_table_rounds_and_escapes():
    text = markdown_table(pd.DataFrame({"a|b": ["x|y"], "v": [0.12345]}), digits=2)
    assert text.splitlines() == ["| a\\|b | v |", "|---|---|", "| x\\|y | 0.12 |"]


def test_document_of_an_unfinished_run_names_the_missing_file(tmp_path, capsys):
    args = ["--run-dir", str(tmp_path), "--wall-seconds", "1", "--out-dir", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "results/evaluation/scores_sd.tsv: missing" in err
    assert not (tmp_path / "cpu-showcase.md").exists()

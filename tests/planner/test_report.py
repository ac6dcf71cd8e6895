import json
import shutil
import subprocess

import pytest
import yaml

from tests.planner.test_search import _plan, _spec
from trainplan.ir.loading import validate
from trainplan.ir.plan import Plan
from trainplan.planner.report import report_dict, report_markdown, summary_text, write_reports
from trainplan.planner.report_html import report_html

REQUIRED = {
    "plan": ["mesh", "micro_batch", "num_microbatches", "schedule", "virtual_stages", "zero", "recompute",
             "sequence_parallel", "stages"],
    "estimate": ["step_time_s", "tokens_per_s", "samples_per_s", "tflops_per_device", "mfu",
                 "memory_per_device_bytes", "memory_breakdown", "comm_time_s", "bubble_fraction"],
    "model": ["params"],
    "search": ["candidates", "elapsed_s"],
}


@pytest.fixture(scope="module")
def plan():
    return _plan(_spec(pp=2, schedule="1f1b", tp=2))


def test_json_report_carries_the_documented_fields(plan):
    report = report_dict(plan, elapsed_s=0.5)
    for section, keys in REQUIRED.items():
        for key in keys:
            assert key in report[section], f"{section}.{key}"
    assert set(report["plan"]["mesh"]) == {"dp", "tp", "pp"}
    assert set(report["estimate"]["memory_breakdown"]) >= {"params", "grads", "optimizer", "activations"}
    assert set(report["estimate"]["comm_time_s"]) == {"dp", "dp_in_forward", "dp_in_backward", "dp_in_update", "tp", "pp"}
    stage = report["plan"]["stages"][0]
    assert {"units", "modules", "ranks", "params", "memory_bytes"} <= set(stage)
    assert report["alternatives"] and report["search"]["elapsed_s"] == 0.5


def test_saved_plan_re_reports_byte_identically(plan, tmp_path):
    first = write_reports(plan, tmp_path / "a", elapsed_s=None)
    again = validate(Plan, yaml.safe_load((tmp_path / "a" / "plan.yaml").read_text()))
    second = write_reports(again, tmp_path / "b", elapsed_s=None)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert summary_text(again) == summary_text(plan)


def test_text_and_markdown_name_the_layout(plan):
    text, md = summary_text(plan), report_markdown(plan)
    for out in (text, md):
        assert "dp=4 tp=2 pp=2" in out and "alternatives" in out.lower()


def test_html_has_timeline_memory_bars_mesh_and_alternatives(plan):
    html = report_html(plan)
    m, p = plan.num_microbatches, plan.mesh.pp
    assert html.count('class="op"') == 2 * p * m  # one forward and one backward per micro-batch per rank
    assert html.count('class="mem"') == 5 * plan.mesh.pp  # one bar per pipeline rank
    assert "device limit" in html and "Mesh and placement" in html and "Alternatives" in html
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_huge_schedules_are_drawn_with_fewer_microbatches():
    big = _plan(_spec(pp=8, schedule="gpipe"))
    big = big.model_copy(update={"num_microbatches": 400})  # a display test: the plan need not be consistent
    html = report_html(big)
    assert html.count('class="op"') == 2 * 8 * 250  # MAX_TIMELINE_OPS // (2 * pp) micro-batches
    assert "simulated with 250 of the step" in html and "400 micro-batches" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(plan, tmp_path):
    write_reports(plan, tmp_path, elapsed_s=None)
    page = (tmp_path / "report.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="op"') == 2 * plan.mesh.pp * plan.num_microbatches
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1024,1400", page],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000  # a blank page compresses to a few hundred bytes

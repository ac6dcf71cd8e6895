"""The `trainplan` command as a person uses it: real subprocesses, exit codes, files written."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


def trainplan(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "trainplan", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_inspect_prints_units_totals_and_closed_form_checks():
    out = trainplan("inspect", "plans/laptop-gpt-tiny.yaml")
    assert out.returncode == 0, out.stderr
    assert "layers.0-3" in out.stdout and "embedding" in out.stdout and "head" in out.stdout
    assert "Megatron-LM Eq. 2 + final LayerNorm" in out.stdout
    assert "(+0.000%)" in out.stdout or "(-0.000%)" in out.stdout


def test_inspect_json_totals_match_megatron_eq2():
    out = trainplan("inspect", "plans/laptop-gpt-tiny.yaml", "--format", "json")
    body = json.loads(out.stdout)
    l, h, v, s = 4, 128, 512, 64
    assert body["totals"]["params"] == 12 * l * h * h + 13 * l * h + v * h + s * h + 2 * h
    assert [g["count"] for g in body["groups"]] == [1, 4, 1]
    palm = [c for c in body["checks"] if "PaLM" in c["check"]][0]
    assert abs(palm["relative_error"]) < 0.02


def _write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nmodel: {catalogue: gpt, args: {layers: 2, hidden: 64, heads: 5}}\ntraining: {global_batch: 8}\n"
         "cluster: {preset: cpu-local}\n", "model.args: heads (5) must divide hidden (64)"),
        ("name: x\nmodel: {catalogue: gpt, args: {layers: 2, hidden: 64, heads: 4}}\ntraining: {global_batch: 8}\n"
         "cluster: {preset: cpu-local}\nparallel: {tp: -2}\n", "parallel.tp: expected 'auto' or a positive integer, got -2"),
        ("name: x\nmodel: {catalogue: gtp}\ntraining: {global_batch: 8}\ncluster: {preset: cpu-local}\n",
         "model.catalogue: unknown model 'gtp'"),
        ("name: x\nmodel: {catalogue: gpt, args: {layers: 2, hidden: 64, heads: 4}}\ntraining: {global_batch: 8}\n"
         "cluster: {preset: a200}\n", "cluster: unknown preset 'a200'"),
        ("name: x\nmodel: {import: 'nosuchpkg.models:build'}\ntask: {kind: lm, vocab: 8, seq_len: 4}\n"
         "training: {global_batch: 8}\ncluster: {preset: cpu-local}\n", "model.import: cannot import module 'nosuchpkg.models'"),
        ("name: [unclosed\n", "invalid YAML"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "plan"])
def test_bad_specs_exit_2_with_one_clear_message(tmp_path, text, message, command):
    out = trainplan(command, _write(tmp_path, text), "-o" if command == "plan" else "--format",
                    tmp_path / "out" if command == "plan" else "text")
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "spec.yaml" in out.stderr


def test_untraceable_model_names_the_module_and_suggests_leaf_modules(tmp_path):
    (tmp_path / "usermodel.py").write_text(
        "import torch\n"
        "class Gate(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x if x.sum() > 0 else -x\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(8, 4); self.gate = Gate()\n"
        "    def forward(self, x):\n"
        "        return self.gate(self.fc(x))\n"
        "def build():\n    return Net()\n")
    spec = _write(tmp_path, "name: user\nmodel: {import: 'usermodel:build'}\n"
                            "task: {kind: classification, input_shape: [8], classes: 4}\n"
                            "training: {global_batch: 8}\ncluster: {preset: cpu-local}\n")
    out = trainplan("inspect", spec)
    assert out.returncode == 2 and "gate" in out.stderr and "leaf_modules" in out.stderr, out.stderr
    fixed = spec.read_text().replace("model: {import: 'usermodel:build'}", "model: {import: 'usermodel:build', leaf_modules: [Gate]}")
    spec.write_text(fixed)
    assert trainplan("inspect", spec).returncode == 0


@pytest.mark.slow
def test_plan_writes_plan_and_reports_and_re_reports_identically(tmp_path):
    out = trainplan("plan", "plans/laptop-gpt-tiny.yaml", "-o", tmp_path / "a")
    assert out.returncode == 0, out.stderr
    assert "layout" in out.stdout and "step time" in out.stdout
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert names == {"plan.yaml", "report.json", "report.md", "report.html"}
    again = trainplan("plan", tmp_path / "a" / "plan.yaml", "-o", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    for name in ("plan.yaml", "report.md", "report.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    first, second = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert first["search"].pop("elapsed_s") > 0 and second["search"].pop("elapsed_s") is None
    assert first == second
    plan = yaml.safe_load((tmp_path / "a" / "plan.yaml").read_text())
    assert plan["mesh"]["dp"] * plan["mesh"]["tp"] * plan["mesh"]["pp"] == 4


@pytest.mark.slow
def test_plan_with_nodes_and_cluster_overrides_and_json_output(tmp_path):
    out = trainplan("plan", "plans/laptop-gpt-tiny.yaml", "-o", tmp_path, "--cluster", "a100-80g", "--nodes", "2",
                    "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    mesh = report["plan"]["mesh"]
    assert mesh["dp"] * mesh["tp"] * mesh["pp"] == 16


@pytest.mark.slow
def test_infeasible_spec_exits_nonzero_with_the_closest_candidates(tmp_path):
    spec = (REPO / "plans" / "gpt3-175b-a100.yaml").read_text().replace("nodes: 128}", "nodes: 1}")
    out = trainplan("plan", _write(tmp_path, spec), "-o", tmp_path / "out")
    assert out.returncode == 2, out.stdout
    assert "no layout fits" in out.stderr and "would fit with" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_plan_uses_a_cluster_file_like_the_one_calibrate_writes(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "name: measured host\nnodes: 1\ndevices_per_node: 2\nbackend: gloo\n"
        "device: {name: CPU process, memory: 2 GiB, peak_flops: {fp32: 150 GFLOP/s}, efficiency: 0.8}\n"
        "intra_node: {bandwidth: 2.4 GB/s, latency: 120 us}\ninter_node: {bandwidth: 2.4 GB/s, latency: 120 us}\n")
    out = trainplan("plan", "plans/laptop-gpt-tiny.yaml", "-o", tmp_path / "out", "--cluster", cluster, "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    mesh = report["plan"]["mesh"]
    assert mesh["dp"] * mesh["tp"] * mesh["pp"] == 2
    plan = yaml.safe_load((tmp_path / "out" / "plan.yaml").read_text())
    assert plan["spec"]["cluster"]["name"] == "measured host"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndevices_per_node: 2\n")
    out = trainplan("plan", "plans/laptop-gpt-tiny.yaml", "-o", tmp_path / "o2", "--cluster", bad)
    assert out.returncode == 2 and "cluster.device: required field is missing" in out.stderr, out.stderr


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_plans_for_this_machine_and_matches_the_single_process_run(tmp_path):
    cluster = tmp_path / "calibrated.yaml"  # as `trainplan calibrate` writes it, measured with another --nproc
    cluster.write_text(
        "name: measured host\nnodes: 1\ndevices_per_node: 4\nbackend: gloo\n"
        "device: {name: CPU process, memory: 2 GiB, peak_flops: {fp32: 30 GFLOP/s}, efficiency: 0.5, kernel_launch: 20 us}\n"
        "intra_node: {bandwidth: 2.4 GB/s, latency: 120 us}\ninter_node: {bandwidth: 2.4 GB/s, latency: 120 us}\n")
    parallel = trainplan("run", "plans/laptop-gpt-tiny.yaml", "--nproc", "2", "--steps", "3", "--out", tmp_path / "p2",
                         "--cluster", cluster)
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    assert "plan: dp=" in parallel.stdout
    ran = yaml.safe_load((tmp_path / "p2" / "plan.yaml").read_text())["spec"]["cluster"]
    assert (ran["name"], ran["nodes"], ran["devices_per_node"]) == ("measured host", 1, 2)
    single = trainplan("run", "plans/laptop-gpt-tiny.yaml", "--nproc", "1", "--steps", "3", "--out", tmp_path / "p1")
    assert single.returncode == 0, single.stdout + single.stderr
    a, b = _losses(tmp_path / "p2"), _losses(tmp_path / "p1")
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (a, b)
    summary = json.loads((tmp_path / "p2" / "summary.json").read_text())
    assert summary["measured_over_estimated"] > 0 and summary["estimated_step_time_s"] > 0


@pytest.mark.slow
def test_run_refuses_a_plan_for_another_world_size(tmp_path):
    planned = trainplan("plan", "plans/laptop-gpt-tiny.yaml", "-o", tmp_path)
    assert planned.returncode == 0, planned.stderr
    out = trainplan("run", tmp_path / "plan.yaml", "--nproc", "3", "--out", tmp_path / "run")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "3" in out.stderr and "4" in out.stderr
    out = trainplan("run", tmp_path / "plan.yaml", "--cluster", "cpu-local", "--out", tmp_path / "run")
    assert out.returncode == 2 and "--cluster applies to a spec" in out.stderr, out.stderr

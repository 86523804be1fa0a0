"""benchmarks/gpu.sh --dry-run: the GPU benchmark's own steps, on the CPU at tiny scale, so the script
is known to work before device time is spent on it (timings are printed, never asserted)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_benchmark_dry_run_measures_both_backbones_and_precisions(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu-results.jsonl").read_text().splitlines()]
    assert [(r["backbone"], r["precision"]) for r in rows] == [
        ("efficientnet_lite0", "float32"), ("efficientnet_lite0", "mixed_float16"),
        ("resnet50", "float32"), ("resnet50", "mixed_float16")]
    for row in rows:
        assert row["device"] == "CPU" and row["images"] == 12 and row["image_size"] == 32
        assert row["extracted_first"] == 12 and row["extracted_rerun"] == 0
        assert row["batch_size"] == 32 and row["batch_size_auto"] is True
        assert row["featurepipe_img_per_s_excl_build"] > 0 and row["compute_limit_img_per_s"] > 0
        assert row["share_of_model_only"] > 0
        where = row["where_time_goes"]
        assert where["decode_ms_per_image_1thread"] > 0 and where["resize_ms_per_image_1thread"] >= 0
        assert where["host_to_device_ms_per_batch"] is None          # no GPU in a dry run
    summary = (tmp_path / "gpu-summary.txt").read_text()
    assert "efficientnet_lite0" in summary and "mixed_float16" in summary and "share" in summary
    # The student step: `featurepipe run --finetune` timed, with its fold scores.
    student = json.loads((tmp_path / "student-results.json").read_text())
    assert student["folds"] == 2 and student["gpu"] is False and student["epochs_run"] == 1
    assert student["wall_s"] > student["finetune_s"] > 0 and student["seconds_per_epoch"] > 0
    assert 0 <= student["vote_over_folds"] <= 1 and 0 <= student["student_over_folds"] <= 1
    assert student["kept"] in ("finetuned", "frozen") and "student: run --finetune" in summary

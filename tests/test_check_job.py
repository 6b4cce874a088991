"""The check as a job: launch forms, verdicts, reports, exit codes, faults."""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
import xml.etree.ElementTree as ET

import pytest
from helpers import ALL_SCHEMES, FIXTURES, SMALL, check, processes_with, run, torchrun


def test_default_self_launch_passes_with_reports(tmp_path):
    report, junit = tmp_path / "r.json", tmp_path / "j.xml"
    result = check("--nproc", "4", "--report", str(report), "--junit", str(junit))
    assert result.code == 0, result
    summary = json.loads(report.read_text())["summary"]
    assert summary["failed"] == 0 and summary["passed"] > 0 and summary["world_size"] == 4
    # Each rank's CPU seconds in its case stages (benchmarks' figure 8): every rank did work.
    assert len(summary["rank_cpu_s"]) == 4 and all(s > 0 for s in summary["rank_cpu_s"]), summary
    assert result.out.strip().splitlines()[-1] == f"{summary['passed']} passed, 0 failed, {summary['skipped']} skipped"
    # Every scheme ran somewhere in the default matrix (skips are reported, never counted as passed),
    # and the breadth geometries add zigzag along a spatial axis.
    cases = json.loads(report.read_text())["cases"]
    ran = {c["scheme"] for c in cases if c["status"] == "passed" and c["config"] != "probe"}
    assert ran == ALL_SCHEMES | {"zigzag:h", "zigzag:w"}
    assert all(c["details"] for c in cases if c["status"] == "skipped")
    suite = ET.parse(junit).getroot()
    assert int(suite.get("tests")) == len(cases) and int(suite.get("failures")) == 0


@pytest.mark.parametrize("nproc", ["3", "4"])
def test_torchrun_standalone(nproc):
    result = torchrun("--standalone", "--nproc-per-node", nproc, "-m", "sp_rope.check", "--quiet")
    assert result.code == 0, result
    assert result.out.strip().endswith("skipped") and " 0 failed" in result.out


def test_torchrun_multinode_style_rendezvous():
    result = torchrun(
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        "--rdzv-id",
        uuid.uuid4().hex[:8],
        "-m",
        "sp_rope.check",
        "--quiet",
        *SMALL,
    )
    assert result.code == 0, result


def test_torchrun_rejects_bare_nproc_as_the_readme_says():
    result = torchrun("--nproc", "2", "-m", "sp_rope.check")
    assert result.code != 0 and "ambiguous" in result.err, result


def test_console_script():
    script = shutil.which("sp-rope-check")
    assert script, "the sp-rope-check console script is not installed (pip install -e .)"
    result = run([script, "--nproc", "2", "--quiet", *SMALL])
    assert result.code == 0, result


def test_wrong_neighbour_slice_fails_naming_rank_scheme_and_token(tmp_path):
    report = tmp_path / "report.json"
    result = check("--nproc", "4", "--report", str(report), "--impl", f"{FIXTURES}/faulty.py:neighbour_slice", *SMALL)
    assert result.code == 1, result
    assert (
        "slice-mismatch: rank 0 (contiguous:t, P=2) cos differs from the unsharded table at token (t=0, h=0, w=0)"
        in result.out
    )
    # Every case fails but the probe's device field (its tables are on meta, with no values to
    # judge) and its whole tables (SP size 1: no other rank's rows to hand out), at both sizes.
    passed = {(c["config"], c["scheme"]) for c in json.loads(report.read_text())["cases"] if c["status"] == "passed"}
    whole = ["sp_size 1 (unsharded)", *(f"sp_size 1 (unsharded), {other}" for other in (
        "layout half", "layout neox", "dtype float32"))]
    assert passed == {("probe", f"{field}{size}") for field in ("device", *whole) for size in ("", " at 145152 tokens")}


def test_in_place_mutation_of_a_cached_table_is_caught():
    result = check("--nproc", "2", "--impl", f"{FIXTURES}/mutating.py:scale_in_place", *SMALL)
    assert result.code == 1, result
    assert "mutated-in-place" in result.out


def test_a_write_into_the_unsharded_table_the_implementation_kept_is_caught():
    """The check drops its copy of the run's largest unsharded tables once their rows are digested
    (it keeps smaller ones); the tables the implementation returned are watched by weak
    reference, so a write into one it kept is seen either way."""
    result = check("--nproc", "2", "--impl", f"{FIXTURES}/mutating.py:writes_into_its_unsharded_table", *SMALL)
    assert result.code == 1, result
    assert "wrote into the unsharded table it had returned" in result.out, result.out


def test_an_implementation_that_raises_on_one_rank_is_a_verdict_naming_it(tmp_path):
    # The implementation failed, the check did not: its cases fail (exit 1), the job goes on.
    marker = uuid.uuid4().hex
    report = tmp_path / f"{marker}.json"
    result = check("--nproc", "4", "--report", str(report), "--impl", f"{FIXTURES}/faulty.py:raise_on_rank2", *SMALL)
    assert result.code == 1, result
    raised = r"implementation-error: rank 2\b.*injected failure on rank 2"
    assert re.search(raised, result.out), result
    # (Its SP partners' attention, fed rank 2's unrotated rows, may fail too.)
    assert "implementation-error" in json.loads(report.read_text())["summary"]["diagnoses"]
    assert processes_with(marker) == []


def test_tables_on_another_device_than_asked_are_a_verdict_naming_the_rank():
    result = check("--nproc", "4", "--impl", f"{FIXTURES}/faulty.py:on_meta_on_rank2", *SMALL)
    assert result.code == 1, result
    assert re.search(r"wrong-device: rank 2\b.*asked for cpu, got cos on meta, sin on meta", result.out), result
    assert not re.search(r"wrong-device: rank [013]\b", result.out), result


def test_a_cache_that_cannot_hold_a_real_model_table_fails_the_default_run():
    # Wan 720p's float64 unsharded table (2 x 74 MiB) is larger than this cache's 128 MiB budget.
    result = check("--nproc", "4", "--seed", "1", "--impl", f"{FIXTURES}/faulty.py:byte_budget_lru")
    assert result.code == 1, result
    assert re.search(r"FAIL b-720p/.*implementation-error: .*KeyError", result.out), result


def test_ranks_that_reach_one_key_for_one_table_pass(tmp_path):
    # 4 frames over P = 4: rank r at start_frame 1 covers rank r + 1's frame at start_frame 0.
    config = tmp_path / "four_frames.toml"
    config.write_text('name = "four-frames"\ngrid = [4, 2, 2]\nhead_dim = 16\n')
    impl = f"{FIXTURES}/frames_keyed.py"
    result = check("--nproc", "4", "--impl", f"{impl}:rope", "--impl-cache", f"{impl}:CACHE", "--config", str(config),
                   "--schemes", "contiguous:t", "--dtypes", "float32", "--layouts", "interleaved",
                   "--start-frames", "0,1")
    assert result.code == 0, result
    assert "0 failed" in result.out.strip().splitlines()[-1], result


def test_ranks_that_reach_one_key_for_tables_one_process_tells_apart_pass():
    # A window of frames per key, checked on every hit: rank 0 of a case, replayed on rank 0
    # before rank 1, still gives rank 1 its own table.
    impl = f"{FIXTURES}/frame_window.py"
    result = check("--nproc", "4", "--impl", f"{impl}:rope", "--impl-cache", f"{impl}:CACHE", *SMALL)
    assert result.code == 0, result
    assert "0 failed" in result.out.strip().splitlines()[-1], result


def test_positions_in_the_default_dtype_fail_as_a_bfloat16_model_calls_them():
    # Right under torch's float32 default; every implementation call runs with bfloat16 as the
    # default, as in a script that loads its model in bfloat16, and positions past 256 then
    # repeat and skip (start_frame 4096 here).
    impl = f"{FIXTURES}/default_dtype_positions.py"
    result = check("--nproc", "2", "--impl", f"{impl}:rope", *SMALL, "--level", "table")
    assert result.code == 1, result
    assert "oracle-mismatch" in result.out, result


def test_rank_that_hangs_ends_job_after_timeout_naming_it():
    marker = uuid.uuid4().hex
    result = check(
        "--nproc",
        "4",
        "--timeout",
        "5",
        "--report",
        f"/tmp/{marker}.json",
        "--impl",
        f"{FIXTURES}/faulty.py:hang_on_rank2",
        *SMALL,
        timeout=60,
    )
    assert result.code == 3, result
    assert result.seconds < 5 + 45, result  # healthy ranks finish their share up to the next collective first
    # Rank 2 is named; on a loaded machine a slow healthy rank may be named beside it.
    assert re.search(r"rank\(s\) (\d+, )*2(, \d+)* did not reach phase '[^']+'", result.err), result
    time.sleep(0.5)  # the agent has already reaped its workers; give /proc a moment
    assert processes_with(marker) == []


def test_bad_input_under_torchrun_is_exit_2_on_every_rank():
    result = torchrun("--standalone", "--nproc-per-node", "2", "-m", "sp_rope.check", "--dtypes", "float16")
    assert result.code != 0, result
    # Each rank exited 2 (torchrun lists them); rank 0 said why, once, without a traceback.
    assert result.err.count("exitcode: 2") + result.err.count("exitcode  : 2") >= 1, result
    assert result.err.count("--dtypes: unknown value 'float16'") == 1, result
    assert "sp_rope/check.py" not in result.err  # torchrun's own summary has a traceback; ours none

"""diffusers' own context-parallel plans, applied to tiny models on 2 CPU ranks (``sp_rope.cp_plans``).

The expectations below are written out by hand for diffusers 0.42.1 (the version the project pins):
which classes declare a ``_cp_plan``, which tiny cases pass, and which fail for the documented
findings (README, "diffusers' context-parallel plans").
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import REPO, Run, run

pytest.importorskip("diffusers", reason="sp_rope.cp_plans checks diffusers' plans: pip install -e '.[diffusers]'")

DIFFUSERS = "0.42.1"
# Every class diffusers 0.42.1 exports with a _cp_plan (all of them have a rotary embedding).
CLASSES_WITH_PLAN = {
    "ChronoEditTransformer3DModel",
    "Flux2Transformer2DModel",
    "FluxTransformer2DModel",
    "HeliosTransformer3DModel",
    "LTX2VideoTransformer3DModel",
    "LTXVideoTransformer3DModel",
    "MiniMaxH3Transformer3DModel",
    "QwenImageTransformer2DModel",
    "WanTransformer3DModel",
}
# Cases whose RoPE split and sharded output must both pass: any failure here is a false positive.
PASSING = {"Wan", "Wan-TI2V", "ChronoEdit", "Flux", "Flux2", "QwenImage", "LTX-nomask", "Helios", "MiniMaxH3"}


def cp_plans(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> Run:
    return run([sys.executable, "-m", "sp_rope.cp_plans", *args], timeout=timeout, env=env)


def test_installed_diffusers_is_the_one_these_expectations_describe():
    import diffusers

    assert diffusers.__version__ == DIFFUSERS, "re-derive the expectations in this file for the new diffusers"


@pytest.mark.timeout(900)
def test_every_model_with_a_plan_is_checked_without_false_positives(tmp_path):
    report_path = tmp_path / "cp.json"
    result = cp_plans("--nproc", "2", "--report", str(report_path))
    # Exit 1: the LTX/LTX2 findings below are real failures of diffusers 0.42.1's plans.
    assert result.code == 1, result
    report = json.loads(report_path.read_text())
    rows = {m["model"]: m for m in report["models"]}
    assert {m["class_name"] for m in report["models"]} == CLASSES_WITH_PLAN, result
    assert not [m for m in report["models"] if m["verdict"].startswith("not checked")], result

    for name in PASSING:
        assert (rows[name]["rope"], rows[name]["end_to_end"], rows[name]["verdict"]) == ("pass", "pass", "pass"), (
            name,
            result,
        )
    # At the RoPE level: Wan (rope output split on dim 1), LTX (dim 1 of (B, S, D)), Flux (ids split).
    for name in ("Wan", "LTX", "Flux"):
        assert rows[name]["rope"] == "pass", result

    # LTX with the text mask its pipeline passes: the RoPE split is right, the sharded forward raises
    # (the per-head mask does not survive Ulysses' head split).
    assert (rows["LTX"]["rope"], rows["LTX"]["end_to_end"]) == ("pass", "FAIL"), result
    assert any("_native_attention_forward_op" in line for line in rows["LTX"]["diagnoses"]), result
    # LTX2: the cross-attention RoPE is missing from the plan; every rank gets all 16 rows for its 8 tokens.
    bad_ca = "transformer_blocks.0.audio_to_video_attn query_rotary_emb[0] has shape (1, 16, 32) for this rank's 8"
    assert rows["LTX2-nomask"]["rope"] == "FAIL", result
    assert any(line.startswith("LTX2-nomask ranks 0, 1: " + bad_ca) for line in rows["LTX2-nomask"]["diagnoses"])
    # LTX2 with rope_type="split": 4-D tables, the plan's expected_dims=3 entry silently skips the split.
    bad_self = "transformer_blocks.0.attn1 query_rotary_emb[0] has shape (1, 4, 16, 4) for this rank's 8 tokens"
    assert rows["LTX2-split"]["rope"] == "FAIL", result
    assert any(bad_self in line for line in rows["LTX2-split"]["diagnoses"]), result
    assert rows["LTX2"]["verdict"] == "FAIL", result

    summary = report["summary"]
    assert (summary["passed"], summary["failed"], summary["not_checked"]) == (9, 4, 0), result
    assert f"{summary['passed']} passed, {summary['failed']} failed, 0 not checked" in result.out


@pytest.mark.timeout(600)
def test_planted_wrong_splits_fail_naming_model_rank_and_first_bad_token():
    result = cp_plans("--models", "Wan,Flux", "--plant", "wan:rope-input", "--plant", "flux:rope-joint")
    assert result.code == 1, result
    # Wan: the rope module's input split on frames -> every rank computes frames 0-1. Rank 1 holds
    # tokens 8..15 of the 4x2x2 grid; its first token is (t=2, h=0, w=0). Rank 0's positions are right.
    assert (
        "Wan rank 1: blocks.0.attn1 rotary_emb[0] row 0 is not the rope of the token it rotates, "
        "first bad token hidden_states[8] (t=2, h=0, w=0)"
    ) in result.out, result
    assert "Wan rank 0: blocks.0.attn1" not in result.out, result
    # Flux: the joint [8 text, 16 image] rope split evenly (12 rows a rank). Rank 1 holds text 4-7 and
    # image 8-15 but gets the rows of image 4-15; text rows all share ids (0, 0, 0), so its first wrong
    # row is its first, text token 4. Rank 0 (text 0-3, image 0-7) gets text 0-7 and image 0-3: row 4
    # (image 0, ids (0, 0, 0)) is right by coincidence, row 5 (image 1) is the first wrong one.
    assert (
        "Flux rank 1: transformer_blocks.0.attn image_rotary_emb[0] row 0 is not the rope of the token it rotates, "
        "first bad token encoder_hidden_states[4]"
    ) in result.out, result
    assert (
        "Flux rank 0: transformer_blocks.0.attn image_rotary_emb[0] row 5 is not the rope of the token it rotates, "
        "first bad token hidden_states[1] (t=0, h=0, w=1)"
    ) in result.out, result
    assert "0 passed, 2 failed" in result.out, result


def _run_python(code: str) -> Run:
    return run([sys.executable, "-c", code], timeout=300)


def test_a_diffusers_without_cp_plans_is_exit_2_in_one_line():
    # Simulate an older diffusers: ModelMixin without the _cp_plan attribute.
    result = _run_python(
        "import diffusers.models.modeling_utils as m; del m.ModelMixin._cp_plan\n"
        "from sp_rope.cp_plans import main; raise SystemExit(main(['--models', 'Wan']))"
    )
    assert result.code == 2, result
    assert result.err.strip().count("\n") == 0 and "Traceback" not in result.err, result
    assert "has no context-parallel plans to check (ModelMixin._cp_plan missing)" in result.err, result


def test_a_model_class_without_a_plan_is_exit_2_naming_it(monkeypatch, capsys):
    import diffusers

    from sp_rope.cp_plans import main

    monkeypatch.delattr(diffusers.WanTransformer3DModel, "_cp_plan")  # falls back to ModelMixin's None
    assert main(["--models", "Wan"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sp_rope.cp_plans: --models: Wan: WanTransformer3DModel has no _cp_plan in diffusers " + DIFFUSERS
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "Foo"], "--models: unknown model 'Foo'"),
        (["--nproc", "3"], "--nproc: 3 is not supported"),
        (["--plant", "wan:rope-dim"], "--plant: unknown kind 'rope-dim'"),
        (["--models", "Wan", "--plant", "flux:rope-joint"], "--plant: Flux is not among the models"),
        (["--timeout", "0"], "--timeout: must be > 0"),
        (["--report", "/no/such/dir/out.json"], "--report: the directory of '/no/such/dir/out.json' does not exist"),
    ],
)
def test_bad_input_is_exit_2_in_one_line(args, message, capsys):
    from sp_rope.cp_plans import main

    assert main(args) == 2  # before any rank is started
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err, err


def _worker_pids(marker: str, rank: int) -> list[int]:
    """Ranks of the job carrying ``marker`` in their environment."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SP_ROPE_TEST_MARKER={marker}".encode() in environ and f"RANK={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.mark.timeout(600)
def test_a_rank_that_dies_is_exit_3_naming_it(tmp_path):
    import subprocess

    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SP_ROPE_TEST_MARKER=marker, OMP_NUM_THREADS="1")
    job = subprocess.Popen(
        [sys.executable, "-m", "sp_rope.cp_plans", "--models", "Helios,Wan", "--timeout", "30"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not _worker_pids(marker, 1) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        victims = _worker_pids(marker, 1)
        assert victims, "rank 1 never started"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 3, (out, err)
    assert "infrastructure failure (exit 3): rank 1 exited with code -9" in err, err


def test_rope_rows_are_checked_against_the_tokens_found_by_value():
    import torch

    from sp_rope.cp_plans.rank import compare_probe
    from sp_rope.cp_plans.recipes import RopeProbe, Stream

    probe = RopeProbe("attn", "rope", (Stream("x", (1, 2, 3)),), (0,), 1)
    hidden = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(0))
    rope = torch.arange(6.0).reshape(1, 6, 1) * torch.ones(1, 6, 4)  # row i is all i
    reference = {"x": hidden, "rope": (rope,)}
    # This rank holds tokens 4 and 1 (in that order) and received the rope rows of tokens 4 and 2.
    shard = {"x": hidden[:, [4, 1]], "rope": (rope[:, [4, 2]],)}
    outcome = compare_probe(probe, reference, shard)
    assert outcome.tokens == [[4, 1]] and outcome.stream_sizes == [6]
    assert outcome.problems == [
        "attn rope[0] row 1 is not the rope of the token it rotates, first bad token x[1] (t=0, h=0, w=1): "
        "max err 1 (1 of 2 rows wrong)"
    ]
    right = compare_probe(probe, reference, {"x": hidden[:, [4, 1]], "rope": (rope[:, [4, 1]],)})
    assert right.problems == [] and right.max_err == 0.0
    # Tokens 1 and 3 carry the same activations: which one a row is cannot be known, so nothing is
    # judged (a verdict here could be a false positive).
    twins = hidden.clone()
    twins[:, 3] = twins[:, 1]
    unknown = compare_probe(probe, {"x": twins, "rope": (rope,)}, {"x": twins[:, [4, 1]], "rope": (rope[:, [4, 2]],)})
    assert unknown.problems == [] and unknown.undetermined is not None and "more than one token" in unknown.undetermined


def test_hidden_state_shards_that_overlap_or_leave_a_token_out_fail_the_rope_split():
    from sp_rope.cp_plans.job import merge
    from sp_rope.cp_plans.rank import ProbeOutcome, RankReport
    from sp_rope.cp_plans.recipes import RECIPES

    wan = RECIPES["Wan"]
    label = wan.probes[0].label

    def report(rank: int, tokens: list[int]) -> RankReport:
        return RankReport(rank, probes=[ProbeOutcome(label, [tokens], [16])], e2e_err=0.0, e2e_tol=1e-5)

    halves = merge(wan, [report(0, list(range(8))), report(1, list(range(8, 16)))])
    assert (halves.rope, halves.verdict) == ("pass", "pass")
    overlap = merge(wan, [report(0, list(range(9))), report(1, list(range(8, 15)))])
    assert overlap.rope == "FAIL" and overlap.verdict == "FAIL"
    assert overlap.diagnoses == [
        "Wan: blocks.0.attn1 hidden_states: token 8 is on ranks [0, 1] (1 tokens on more than one rank)",
        "Wan: blocks.0.attn1 hidden_states: token 15 is on no rank",
    ]

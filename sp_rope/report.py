"""Case results and the three ways they leave the job: a human table, JSON and JUnit XML."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

# Diagnoses a failing case can carry (a case may carry several), in report order: the table
# level's findings before the upper levels', so a case's first line names the root cause.
DIAGNOSES = {
    "slice-mismatch": "a rank's slice differs from the unsharded table, or the ranks' tokens do not partition the grid",
    "oracle-mismatch": "the unsharded table differs from the float64 formula beyond tolerance",
    "wrong-device": "a table came back on another device than the one asked for",
    "key-collision": "one cache key maps to two tables (shared by ranks of one SP group, or anywhere), "
    "and one process replaying both calls hands the second the wrong table",
    "unstable-across-steps": "a repeated call (denoising step) returned a different table",
    "stale-after-eviction": "re-requesting a case after other start_frames returned a different table",
    "mutated-in-place": "a cached table was modified in place",
    "plan-mismatch": "a rank claims tokens other than the ones the sharding plan gives it",
    "key-incomplete": "changing one input (the field named) returned a table cached for another input",
    "overwritten-after-return": "a table handed out earlier changed later (a reused buffer or workspace)",
    "implementation-error": "the implementation raised an exception for this case",
    "apply-mismatch": "rotating sharded q/k with the rank's slice differs from the unsharded rotation",
    "attention-mismatch": "sequence-parallel attention output differs from single-rank attention",
}


@dataclass
class CaseResult:
    config: str
    scheme: str
    sp_size: int
    start_frame: int
    dtype: str
    layout: str
    status: str = PASSED
    diagnoses: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    level: str = "table"
    max_abs_error: float = 0.0
    group: str = ""  # the SP layout when not consecutive ranks: "strided", "ranks 1,2,3; rank 0 idle"

    @property
    def case_id(self) -> str:
        group = "-" + self.group.split(";")[0].replace(" ", "").replace(",", "") if self.group else ""
        return f"{self.config}/{self.scheme}/P{self.sp_size}{group}/sf{self.start_frame}/{self.dtype}/{self.layout}" + (
            "" if self.level == "table" else f"/{self.level}"
        )

    def fail(self, diagnosis: str, detail: str) -> None:
        self.status = FAILED
        if diagnosis not in self.diagnoses:
            self.diagnoses.append(diagnosis)
        self.details.append(f"{diagnosis}: {detail}")

    def skip(self, reason: str) -> None:
        self.status = SKIPPED
        self.details.append(reason)


@dataclass
class Report:
    cases: list[CaseResult]
    world_size: int
    backend: str
    implementation: str
    job_errors: list[str] = field(default_factory=list)  # failures not tied to one case
    seed: int | None = None  # the matrix's seed: the same seed reruns the same cases
    # Per rank, the CPU seconds of its case stages (build, judge, levels; not startup, the
    # probe or the exchange): the work that grows with the cases (benchmarks' figure 8).
    rank_cpu_s: list[float] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(case.status == status for case in self.cases)

    @property
    def failed(self) -> int:
        return self.count(FAILED) + len(self.job_errors)

    def diagnoses(self) -> set[str]:
        found = {d for case in self.cases for d in case.diagnoses}
        return found | {err.split(":", 1)[0] for err in self.job_errors}

    def summary_line(self) -> str:
        return f"{self.count(PASSED)} passed, {self.failed} failed, {self.count(SKIPPED)} skipped"

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": {
                "passed": self.count(PASSED),
                "failed": self.failed,
                "skipped": self.count(SKIPPED),
                "world_size": self.world_size,
                "backend": self.backend,
                "implementation": self.implementation,
                "diagnoses": sorted(self.diagnoses()),
                "seed": self.seed,
                "rank_cpu_s": self.rank_cpu_s,
            },
            "job_errors": self.job_errors,
            "cases": [{"id": c.case_id, **asdict(c)} for c in self.cases],
        }

    def human(self, max_failures: int = 20) -> str:
        """One row per (config, scheme, SP size); failures listed after; the count line last."""
        rows: dict[tuple[str, str, int, str, str], list[CaseResult]] = defaultdict(list)
        for case in self.cases:
            # The key-completeness probe has one case per field: one row for them all.
            scheme = "(each key field)" if case.config == "probe" else case.scheme
            rows[(case.config, scheme, case.sp_size, case.group.split(";")[0], case.level)].append(case)
        seed = "" if self.seed is None else f", seed {self.seed} (rerun: --seed {self.seed})"
        lines = [
            f"sp_rope.check: {self.implementation} on {self.world_size} rank(s), backend {self.backend}{seed}",
            f"{'config':<22} {'scheme':<23} {'P':>2} {'group':<11} {'level':<9} "
            f"{'pass':>5} {'fail':>5} {'skip':>5}  note",
        ]
        for (config, scheme, size, group, level), cases in rows.items():
            counts = [sum(c.status == s for c in cases) for s in (PASSED, FAILED, SKIPPED)]
            note = ""
            failing = [c for c in cases if c.status == FAILED]
            if failing:
                note = ",".join(sorted({d for c in failing for d in c.diagnoses}))
            elif counts[2]:
                note = next(c.details[0] for c in cases if c.status == SKIPPED)
            lines.append(
                f"{config:<22} {scheme:<23} {size:>2} {group:<11} {level:<9} {counts[0]:>5} {counts[1]:>5} "
                f"{counts[2]:>5}  {note}".rstrip()
            )
        failing = [c for c in self.cases if c.status == FAILED]
        for case in failing[:max_failures]:
            lines.append(f"FAIL {case.case_id}: {case.details[0]}")
        if len(failing) > max_failures:
            lines.append(f"... {len(failing) - max_failures} more failing cases (see --report)")
        lines.extend(f"FAIL {err}" for err in self.job_errors)
        lines.append(self.summary_line())
        return "\n".join(lines)

    def write_json(self, path: str) -> None:
        write_atomic(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    def write_junit(self, path: str) -> None:
        suite = ET.Element(
            "testsuite",
            name="sp_rope.check",
            tests=str(len(self.cases) + len(self.job_errors)),
            failures=str(self.failed),
            skipped=str(self.count(SKIPPED)),
        )
        for case in self.cases:
            node = ET.SubElement(suite, "testcase", classname=f"sp_rope.{case.config}", name=case.case_id)
            if case.status == FAILED:
                ET.SubElement(node, "failure", message=case.details[0]).text = "\n".join(case.details)
            elif case.status == SKIPPED:
                ET.SubElement(node, "skipped", message=case.details[0])
        for err in self.job_errors:
            node = ET.SubElement(suite, "testcase", classname="sp_rope.job", name=err.split(":", 1)[0])
            ET.SubElement(node, "failure", message=err)
        write_atomic(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))


# ---------------------------------------------------------------------------------------------
# Writing reports safely, and reports for runs that ended without case verdicts


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write through a temporary file in the same directory and ``os.replace``: a reader, or a
    run killed midway, sees the old file or the new one, never half of one. A special file
    (``/dev/stdout``, a FIFO) is written in place: replacing it would replace the device node."""
    target = Path(path)
    if target.exists() and not target.is_file():
        with open(target, "wb") as f:
            f.write(data)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        # os.open with O_EXCL and 0o666: a fresh file with the user's umask, like a plain open().
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def unwritable_reason(path: str) -> str | None:
    """Why a report could not be written at ``path`` (None if it can), found by creating and
    removing a probe file next to it: nothing at ``path`` itself is touched."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        return "is a directory"
    if not parent.exists():
        return f"directory {str(parent)!r} does not exist"
    if not parent.is_dir():
        return f"{str(parent)!r} is not a directory"
    probe = parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        return f"cannot create files in {str(parent)!r}: {exc.strerror or type(exc).__name__}"
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


@dataclass(frozen=True)
class JobOutcome:
    """How a run ended when it has no case verdicts: what its reports say instead of a pass.

    ``status``: ``incomplete`` (written at launch, replaced by the verdict), ``infrastructure-failure``,
    ``interrupted`` or ``bad-input``.
    """

    status: str
    message: str
    rank: int | None = None
    phase: str | None = None
    world_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": {
                "status": self.status,
                "passed": 0,
                "failed": 1,  # a consumer checking ``failed == 0`` must never read this as a pass
                "skipped": 0,
                "world_size": self.world_size,
                "diagnoses": [self.status],
                "rank": self.rank,
                "phase": self.phase,
                "message": self.message,
            },
            "job_errors": [f"{self.status}: {self.message}"],
            "cases": [],
        }


def write_outcome_reports(outcome: JobOutcome, report: str | None, junit: str | None) -> None:
    """Replace the ``--report``/``--junit`` files with ``outcome`` (a report left by an earlier
    run must never survive a run that failed)."""
    if report:
        write_atomic(report, (json.dumps(outcome.to_json(), indent=1) + "\n").encode())
    if junit:
        suite = ET.Element("testsuite", name="sp_rope.check", tests="1", failures="1", skipped="0")
        node = ET.SubElement(suite, "testcase", classname="sp_rope.job", name=outcome.status)
        ET.SubElement(node, "failure", message=outcome.message).text = outcome.message
        write_atomic(junit, ET.tostring(suite, encoding="utf-8", xml_declaration=True))

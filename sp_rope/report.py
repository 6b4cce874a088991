"""Case results and the three ways they leave the job: a human table, JSON and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

# Diagnoses a failing case can carry (a case may carry several).
DIAGNOSES = {
    "slice-mismatch": "gathered rank slices differ from the unsharded table, or ranks hold the wrong tokens",
    "oracle-mismatch": "the unsharded table differs from the float64 formula beyond tolerance",
    "key-collision": "two ranks of one SP group share a cache key, or one key maps to two tables",
    "unstable-across-steps": "a repeated call (denoising step) returned a different table",
    "stale-after-eviction": "re-requesting a case after other start_frames returned a different table",
    "mutated-in-place": "a cached table was modified in place",
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

    @property
    def case_id(self) -> str:
        return f"{self.config}/{self.scheme}/P{self.sp_size}/sf{self.start_frame}/{self.dtype}/{self.layout}" + (
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
            },
            "job_errors": self.job_errors,
            "cases": [{"id": c.case_id, **asdict(c)} for c in self.cases],
        }

    def human(self, max_failures: int = 20) -> str:
        """One row per (config, scheme, SP size); failures listed after; the count line last."""
        rows: dict[tuple[str, str, int, str], list[CaseResult]] = defaultdict(list)
        for case in self.cases:
            rows[(case.config, case.scheme, case.sp_size, case.level)].append(case)
        lines = [
            f"sp_rope.check: {self.implementation} on {self.world_size} rank(s), backend {self.backend}",
            f"{'config':<28} {'scheme':<13} {'P':>2} {'level':<9} {'pass':>5} {'fail':>5} {'skip':>5}  note",
        ]
        for (config, scheme, size, level), cases in rows.items():
            counts = [sum(c.status == s for c in cases) for s in (PASSED, FAILED, SKIPPED)]
            note = ""
            failing = [c for c in cases if c.status == FAILED]
            if failing:
                note = ",".join(sorted({d for c in failing for d in c.diagnoses}))
            elif counts[2]:
                note = next(c.details[0] for c in cases if c.status == SKIPPED)
            lines.append(
                f"{config:<28} {scheme:<13} {size:>2} {level:<9} {counts[0]:>5} {counts[1]:>5} {counts[2]:>5}  {note}"
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
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

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
        ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)

"""The batch manifest: one record per job in the output folder's `manifest.json`, so a rerun of
the same command resumes.

A record holds the job's overrides (its axis values and the `--set` texts a worker applies), its
cache key (the hash of its graph with the overrides applied: a changed graph or value is a new
job), status (`pending`, `running`, `done`, `failed`), attempts, worker losses, output files,
error, times and worker. The file is rewritten atomically (kernels.files.atomic_write) at every
change, so a crash or Ctrl-C leaves the last whole version. Records of jobs a later sweep no
longer has are kept under `earlier`, so narrowing and widening a sweep loses no finished work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "loomwork.batch", 1
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


class ManifestError(ValueError):
    pass


def new_record(job) -> dict:
    return {"index": job.index, "key": job.key, "overrides": dict(job.overrides), "sets": list(job.sets),
            "status": PENDING, "attempts": 0, "lost": 0, "outputs": [], "error": None,
            "seconds": None, "turnaround": None, "worker": None, "ran": []}


class Manifest:
    """The records of one output folder; `records` by job key."""

    def __init__(self, out_dir: Path, plan, records: dict[str, dict], earlier: list[dict]):
        self.out_dir, self.plan = Path(out_dir), plan
        self.records, self.earlier = records, earlier

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @classmethod
    def open(cls, out_dir: "str | Path", plan) -> "Manifest":
        """The folder's manifest merged with `plan`: a job already recorded (by key) keeps its
        record; one left `running` by an interrupted run is pending again, and so is a `done`
        one whose output files are gone."""
        out_dir = Path(out_dir)
        old: dict[str, dict] = {}
        for rec in _read(out_dir / MANIFEST_NAME):
            old[rec["key"]] = rec
        records = {}
        for job in plan.jobs:
            rec = old.pop(job.key, None) or new_record(job)
            rec.update(index=job.index, overrides=dict(job.overrides), sets=list(job.sets))
            if rec["status"] == RUNNING:
                rec["status"] = PENDING
            if rec["status"] == DONE and not all((out_dir / p).is_file() for p in rec["outputs"]):
                rec["status"], rec["outputs"] = PENDING, []
            records[job.key] = rec
        return cls(out_dir, plan, records, list(old.values()))

    def record(self, job) -> dict:
        return self.records[job.key]

    def in_order(self) -> list[dict]:
        return sorted(self.records.values(), key=lambda r: r["index"])

    def counts(self) -> dict:
        counts = {PENDING: 0, RUNNING: 0, DONE: 0, FAILED: 0}
        for rec in self.records.values():
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        return counts

    def as_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "graph": str(self.plan.graph_path),
                "sweep": self.plan.sweep.as_dict(), "set": list(self.plan.sets),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "jobs": self.in_order(), "earlier": self.earlier}

    def save(self) -> None:
        from kernels.files import atomic_write

        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, (json.dumps(self.as_json(), indent=1) + "\n").encode("utf-8"))


def _read(path: Path) -> list[dict]:
    """The records of an existing manifest (none if there is no file); a damaged or foreign one
    is an error naming it, never silently replaced."""
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path}: cannot be read ({exc}); move it away to start the batch afresh") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: not a Loomwork batch manifest; use another --out folder")
    if not isinstance(doc.get("version"), int) or doc["version"] > MANIFEST_VERSION:
        raise ManifestError(f"{path}: manifest version {doc.get('version')!r} is newer than this build reads")
    recs = [r for r in [*doc.get("jobs", []), *doc.get("earlier", [])] if _valid(r)]
    return recs


def _valid(rec) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("index"), int)
            and rec.get("status") in (PENDING, RUNNING, DONE, FAILED) and isinstance(rec.get("outputs"), list)
            and all(isinstance(p, str) and ".." not in Path(p).parts and not Path(p).is_absolute()
                    for p in rec["outputs"])
            and isinstance(rec.get("attempts", 0), int) and isinstance(rec.get("lost", 0), int))


def output_name(rec: dict, name: str) -> str:
    """Where a job's output file goes, relative to the output folder: unique per job (index and
    key), so a retried job replaces its own file and never another job's."""
    flat = name.replace("/", "_").replace("\\", "_")
    return f"images/{rec['index']:05d}-{rec['key'][:10]}-{flat}"


def first_image(rec: dict, out_dir: Path) -> Optional[Path]:
    for p in rec.get("outputs", []):
        if p.lower().endswith(".png") and (out_dir / p).is_file():
            return out_dir / p
    return None

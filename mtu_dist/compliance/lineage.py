"""Model lineages: forget requests honoured one after another, each on the model already in service.

`mtu unlearn --from RUN` where RUN is itself an unlearning run makes the next *step* of RUN's lineage.
Every unlearning run records its lineage in `final/state.json` (`lineage`, format `mtu-lineage/1`):

* `root`: the original model (train run; or a retrain run, whose request's pairs it never saw and which
  are then forgotten from the start): checkpoint folder and model sha256;
* `steps`, oldest first, this run last: run folder, method, request sha256 and path, the parent model
  (folder and sha256) the request was applied to, the `new` pairs it forgot, the `skipped` pairs (asked
  again though an earlier step forgot them: reported, and not ascended again) and its cost in seconds;
* `cumulative`: every pair forgotten along the chain, merged per instance (full and partial entries
  side by side), its size and the sha256 of its canonical request file (`mtu lineage --write-request`
  writes that file: `mtu retrain --request` on it is the gold standard for the whole chain).

What a step guarantees (unlearn.py, commands.py, audit.py): the forget stream holds the new pairs only;
the retain stream and the evaluation's retain sample exclude the *cumulative* set, never only the newest
request; a request for another dataset, or one naming another lineage root (`lineage_root`), is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from mtu_dist.compliance.request import (
    ForgetRequest,
    merge_entries,
    pairs_sha256,
    request_bytes,
    request_from_entries,
    subtract_entries,
)
from mtu_dist.data.manifest import Manifest
from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import sha256_bytes

FORMAT = "mtu-lineage/1"
SHOWN = 5  # pairs named in a message


@dataclass
class Lineage:
    root: dict
    steps: list[dict]  # earlier steps, then this one
    previous: dict[str, tuple[str, ...]]  # forgotten before this step
    new: dict[str, tuple[str, ...]]  # this step forgets these
    skipped: list[str]  # asked again: `instance|task`
    cumulative: dict[str, tuple[str, ...]] = field(default_factory=dict)
    parent_run_id: str | None = None  # the parent step's MLflow run (the chain nests under it)

    @property
    def depth(self) -> int:
        return len(self.steps)

    def cumulative_request(self, manifest: Manifest) -> tuple[ForgetRequest, bytes]:
        return request_from_entries(self.cumulative, manifest, lineage_root=self.root["model_sha256"])

    def record(self, manifest: Manifest) -> dict:
        """The `lineage` entry of state.json (the cumulative request's bytes hashed, not parsed again)."""
        _, data = request_bytes(
            self.cumulative, dataset=manifest.dataset, tasks=manifest.tasks, lineage_root=self.root["model_sha256"]
        )
        return {
            "format": FORMAT,
            "root": self.root,
            "steps": self.steps,
            "cumulative": {i: list(ts) for i, ts in self.cumulative.items()},
            "cumulative_pairs": sum(len(ts) for ts in self.cumulative.values()),
            "cumulative_sha256": sha256_bytes(data),
            "cumulative_pairs_sha256": pairs_sha256(self.cumulative),
        }

    def evaluation_request(self, request: ForgetRequest) -> ForgetRequest:
        """The request as filed, evaluated with every earlier-forgotten instance out of the retain sample."""
        extra = tuple(i for i in self.previous if i not in request.entries)
        return replace(request, retain_exclude=extra)


def start_step(parent: dict, request: ForgetRequest, manifest: Manifest, *, method: str) -> Lineage:
    """The lineage of an unlearning run on `request` from the checkpoint whose state.json is `parent`."""
    where = str(Path(parent["_folder"]).resolve())  # recorded: a chain is read back from anywhere
    if parent.get("dataset") != request.dataset:
        raise UserError(
            f"{request.path}: request is for dataset {request.dataset!r}, but {where} belongs to a "
            f"lineage on {parent.get('dataset')!r}"
        )
    root, steps, previous = _parent_lineage(parent, manifest)
    if request.lineage_root and request.lineage_root != root["model_sha256"]:
        raise UserError(
            f"{request.path}: field 'lineage_root' is {request.lineage_root[:12]}..., but {where} "
            f"descends from original {root['model_sha256'][:12]}... ({root['checkpoint']}); "
            "this request is for another model lineage"
        )
    new, skipped = subtract_entries(request.entries, previous)
    if not new:
        raise UserError(
            f"{request.path}: every one of its {len(skipped)} pair(s) was already forgotten earlier in "
            f"this lineage ({where}); nothing to unlearn"
        )
    step = {
        "run": None,
        "method": method,
        "request_sha256": request.sha256,
        "request_path": str(Path(request.path).resolve()) if request.path else None,
        "parent_checkpoint": where,
        "parent_sha256": parent["sha256"]["model.safetensors"],
        "new": {i: list(ts) for i, ts in new.items()},
        "skipped": skipped,
        "cost_s": None,
    }
    return Lineage(
        root, [*steps, step], previous, new, skipped, merge_entries(manifest, previous, new), _mlflow_run_of(where)
    )


def _parent_lineage(parent: dict, manifest: Manifest) -> tuple[dict, list[dict], dict]:
    """(root, earlier steps, pairs forgotten so far) of the model `parent` describes."""
    where, command = str(Path(parent["_folder"]).resolve()), parent.get("command")
    sha = parent["sha256"]["model.safetensors"]
    if command == "unlearn":
        rec = parent.get("lineage")
        if not rec or rec.get("format") != FORMAT:
            raise UserError(
                f"{where}: this unlearning run recorded no lineage ({FORMAT}); it cannot be traced "
                "back to its original, so no further request can be honoured on it"
            )
        return rec["root"], rec["steps"], _entries(rec["cumulative"])
    if command == "retrain":  # its request's pairs were never seen: forgotten from the start
        forgotten = _request_entries(parent, manifest)
        return (
            {
                "checkpoint": where,
                "model_sha256": sha,
                "command": command,
                "forgotten": {i: list(ts) for i, ts in forgotten.items()},
            },
            [],
            forgotten,
        )
    return {"checkpoint": where, "model_sha256": sha, "command": command or "train"}, [], {}


def _request_entries(state: dict, manifest: Manifest) -> dict[str, tuple[str, ...]]:
    """A run's request, read back from its file (whose sha256 must be the one the run recorded)."""
    from mtu_dist.compliance.request import load_request

    path = state.get("request_path")
    req = load_request(path, manifest) if path else None
    if req is None or req.sha256 != state.get("request_sha256"):
        raise UserError(
            f"{path}: not the request {str(state.get('request_sha256'))[:12]}... that "
            f"{state['_folder']} was made on (moved or changed since)"
        )
    return req.entries


def _entries(raw: dict) -> dict[str, tuple[str, ...]]:
    return {i: tuple(ts) for i, ts in raw.items()}


def _mlflow_run_of(folder: str) -> str | None:
    try:
        return json.loads((Path(folder) / "metrics.json").read_text())["run"].get("mlflow_run_id")
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------
# reading a lineage back: `mtu lineage RUN`
# --------------------------------------------------------------------------


def read_lineage(run: str) -> tuple[dict, dict]:
    """(state.json, its lineage record) of a finished unlearning run, the record checked for consistency:
    the cumulative set is the merge of the root's and every step's pairs."""
    from mtu_dist.runner.checkpoint import read_state

    state = read_state(run)
    rec = state.get("lineage")
    if not rec or rec.get("format") != FORMAT:
        raise UserError(
            f"{state['_folder']}: no lineage recorded (only `mtu unlearn` runs have one; "
            f"command here: {state.get('command')!r})"
        )
    merged: dict[str, set] = {}
    for part in [rec["root"].get("forgotten", {})] + [s["new"] for s in rec["steps"]]:
        for i, ts in part.items():
            merged.setdefault(i, set()).update(ts)
    if {i: set(ts) for i, ts in rec["cumulative"].items()} != merged:
        raise UserError(
            f"{state['_folder']}/state.json: the recorded cumulative forget set is not the merge of "
            "the lineage's steps (state.json edited?)"
        )
    return state, rec


def chain_status(rec: dict, tip_sha: str) -> list[str]:
    """Per step: whether its run folder still holds the model the next step (or the tip) was made from."""
    shas = [s["parent_sha256"] for s in rec["steps"][1:]] + [tip_sha]
    out = []
    for step, expect in zip(rec["steps"], shas):
        state = Path(step["run"] or "") / "final" / "state.json"
        try:
            have = json.loads(state.read_text())["sha256"]["model.safetensors"]
        except (OSError, ValueError, KeyError):
            out.append("run folder missing")
            continue
        out.append("ok" if have == expect else "MODEL CHANGED since the next step was made")
    return out


def lineage_command(
    run: str,
    *,
    write_request: str | None = None,
    as_json: bool = False,
    show_pairs: bool = False,
    overwrite: bool = False,
) -> dict:
    state, rec = read_lineage(run)
    summary = _summary(state, rec)
    if write_request:
        _write_cumulative(state, rec, write_request, overwrite)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(_text(summary, show_pairs))
        if write_request:
            print(
                f"wrote the cumulative forget set to {write_request} "
                f"(sha256 {rec['cumulative_sha256'][:12]}; `mtu retrain --request {write_request}` retrains on its "
                "retain signal)"
            )
    return summary


def _summary(state: dict, rec: dict) -> dict:
    status = chain_status(rec, state["sha256"]["model.safetensors"])
    per_task: dict[str, int] = {}
    for ts in rec["cumulative"].values():
        for t in ts:
            per_task[t] = per_task.get(t, 0) + 1
    tasks = state.get("tasks") or []
    return {
        "run": state["_folder"],
        "dataset": state.get("dataset"),
        "root": rec["root"],
        "steps": [
            {**{k: v for k, v in s.items() if k != "new"}, "new_pairs": sum(map(len, s["new"].values())), "status": st}
            for s, st in zip(rec["steps"], status)
        ],
        "cumulative": {
            "instances": len(rec["cumulative"]),
            "pairs": rec["cumulative_pairs"],
            "full_entries": sum(len(ts) == len(tasks) for ts in rec["cumulative"].values()),
            "per_task": per_task,
            "sha256": rec["cumulative_sha256"],
            "entries": rec["cumulative"],
        },
    }


def _text(summary: dict, show_pairs: bool) -> str:
    root = summary["root"]
    lines = [
        f"lineage of {summary['run']} ({summary['dataset']}), {len(summary['steps'])} request(s)",
        f"  root   {root['command']:<8} {root['model_sha256'][:12]}  {root['checkpoint']}"
        + (f"  (retrained without {sum(map(len, root['forgotten'].values()))} pairs)" if root.get("forgotten") else ""),
    ]
    for n, s in enumerate(summary["steps"], 1):
        cost = f"{s['cost_s']:.1f} s" if s.get("cost_s") is not None else "?"
        lines.append(
            f"  step {n} {s['method']:<12} request {s['request_sha256'][:12]}: {s['new_pairs']} new pair(s), "
            f"{len(s['skipped'])} repeated (skipped), {cost}, from {s['parent_sha256'][:12]}  {s['run']}"
            + ("" if s["status"] == "ok" else f"  [{s['status']}]")
        )
    c = summary["cumulative"]
    lines.append(
        f"  cumulative forget set: {c['pairs']} pairs on {c['instances']} instances ({c['full_entries']} full, "
        f"{c['instances'] - c['full_entries']} partial); per task "
        + ", ".join(f"{t} {n}" for t, n in c["per_task"].items())
        + f"; sha256 {c['sha256'][:12]}"
    )
    if show_pairs:
        lines += [f"    {i}: {', '.join(ts)}" for i, ts in c["entries"].items()]
    return "\n".join(lines)


def _write_cumulative(state: dict, rec: dict, path: str, overwrite: bool) -> None:
    from mtu_dist.utils.fileio import atomic_write_bytes

    _, data = request_bytes(
        _entries(rec["cumulative"]),
        dataset=state["dataset"],
        tasks=state["tasks"],
        lineage_root=rec["root"]["model_sha256"],
    )
    if sha256_bytes(data) != rec["cumulative_sha256"]:  # the very bytes the run scored its cumulative block on
        raise UserError(f"{state['_folder']}/state.json: the cumulative set does not hash to its recorded sha256")
    out = Path(path)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    atomic_write_bytes(out, data)

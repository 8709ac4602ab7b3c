"""`mtu audit RUN [RUN ...]`: prove from a run's ledger that no forget pair supervised it.

Reads `RUN/final/{state.json, ledger.json, metrics.json}` and the run's forget request (the path in
state.json, or `--request` if the file moved; either way its sha256 must be the one the run recorded).
The audit needs neither the shards nor the model code: pairs are matched by their sha256 keys.

1. Integrity: ledger.json's bytes hash to state.json's `ledger_sha256`; the ledger, state.json and the
   request file agree on the request's sha256; every hashed key is the hash of its plain key.
2. No leak: no forget pair under role `retain` or `target` (any run); a `retrain` run consumed no
   forget pair at all, under any role.
3. The `forget` role holds forget pairs only (anything else was ascended on data nobody asked to forget).

A lineage (an unlearning run made from an earlier one's model, lineage.py) is audited as a whole: every
step's run folder, oldest first, each against the cumulative forget set up to and including its own
request (read back from every step's request file, sha256-checked). No pair an earlier step forgot may
reach a later step under any role, its forget role included (repeats are skipped, never re-ascended);
the chain's folders must still hold the models the lineage records. audit.json of the audited run
holds its own step's result at the top level and every step's under `chain`.

The summary is printed, written atomically to `RUN/final/audit.json` and logged to the run's MLflow
run (artifact `audit.json`, tag `mtu.audit`, metric `audit/leaks`). A failed check exits non-zero with
a message naming the pairs; audit.json is written either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mtu_dist.compliance.ledger import FORMAT, pair_hash
from mtu_dist.errors import UserError
from mtu_dist.reporting.tracking import check_reachable, resolve_uri
from mtu_dist.runner.checkpoint import read_state
from mtu_dist.utils.fileio import atomic_write_json, sha256_bytes, sha256_file

SHOWN = 5  # pairs named in an error message


def audit_command(runs: list[str], *, request: str | None = None, tracking_uri: str | None = None) -> list[dict]:
    """Audit each run (a sweep's worth at once); a bad input stops at once, leaks are reported together."""
    if request and len(runs) > 1:
        raise UserError("--request is one run's request file: audit that run on its own")
    results = [audit_run(run, request=request, tracking_uri=tracking_uri) for run in runs]
    failed = [r for r in results if not r["passed"]]
    if failed:
        raise UserError(
            "; ".join(
                f"{r['run']}: audit FAILED: {_failures(r)} (details in {r['run']}/final/audit.json)" for r in failed
            )
        )
    return results


def audit_run(run: str, *, request: str | None = None, tracking_uri: str | None = None) -> dict:
    final = _final_folder(Path(run))
    state = read_state(final)
    if state.get("lineage"):
        result = _audit_chain(final, state, request)
    else:
        ledger = _checked_ledger(final, state)  # an edited ledger is named before anything else
        result = _audit_step(final, state, ledger, _forget_pairs(request, state))
    report = _json(final / "metrics.json")
    mlflow_run = _mlflow_run(report.get("run", {}).get("mlflow_run_id"), tracking_uri)  # fail before writing
    atomic_write_json(final / "audit.json", result)
    if mlflow_run:
        client, run_id = mlflow_run
        client.log_artifact(run_id, str(final / "audit.json"))
        client.set_tag(run_id, "mtu.audit", "passed" if result["passed"] else "LEAK")
        client.log_metric(run_id, "audit/leaks", result.get("chain_leak_count", result["leak_count"]))
    print(summary(result, final / "audit.json", logged=bool(mlflow_run)))
    return result


def _audit_step(
    final: Path, state: dict, ledger: dict, forget: dict[str, str], earlier: dict[str, str] | None = None
) -> dict:
    result = audit(ledger, forget, command=state.get("command"), earlier=earlier)
    return {
        "run": str(final.parent),
        "command": state.get("command"),
        "method": state.get("method"),
        "request_sha256": state["request_sha256"],
        "ledger_sha256": state["ledger_sha256"],
        **result,
    }


def _audit_chain(final: Path, state: dict, request: str | None) -> dict:
    """Every step of the lineage, oldest first, against what was forgotten up to it."""
    from mtu_dist.compliance.lineage import read_lineage

    _, rec = read_lineage(str(final))
    previous = {pair_hash(i, t): f"{i}|{t}" for i, ts in rec["root"].get("forgotten", {}).items() for t in ts}
    models = [s["parent_sha256"] for s in rec["steps"][1:]] + [state["sha256"]["model.safetensors"]]
    steps = []
    for n, (step, model) in enumerate(zip(rec["steps"], models), 1):
        tip = n == len(rec["steps"])
        folder = final if tip else Path(step["run"] or "") / "final"
        if not (folder / "state.json").is_file():
            raise UserError(
                f"{folder}: step {n} of the lineage of {final.parent} is missing; the chain cannot be "
                "audited without every step's run folder"
            )
        st = state if tip else read_state(folder)
        if st["sha256"]["model.safetensors"] != model or st.get("request_sha256") != step["request_sha256"]:
            raise UserError(
                f"{folder}: holds another model or request than step {n} of the lineage of "
                f"{final.parent} records (re-run since?)"
            )
        ledger = _checked_ledger(folder, st)
        mine = _forget_pairs(request if tip else None, st)
        new = {h: k for h, k in mine.items() if h not in previous}
        if sorted(new.values()) != sorted(f"{i}|{t}" for i, ts in step["new"].items() for t in ts):
            raise UserError(
                f"{folder}: step {n}'s request minus the earlier steps' pairs is not what the lineage "
                "records as its new pairs"
            )
        cumulative = {**previous, **mine}
        steps.append({"step": n, **_audit_step(folder, st, ledger, cumulative, earlier=previous)})
        previous = cumulative
    result = {k: v for k, v in steps[-1].items() if k != "step"}
    result["chain"] = steps
    result["chain_leak_count"] = sum(s["leak_count"] for s in steps)
    result["passed"] = all(s["passed"] for s in steps)
    return result


def audit(ledger: dict, forget: dict[str, str], *, command: str | None, earlier: dict[str, str] | None = None) -> dict:
    """The checks on a ledger document. `forget`: sha256 key -> plain `instance|task` of every forget pair
    (a lineage step: every pair forgotten up to and including its request); `earlier`: the pairs earlier
    steps forgot, which may not appear even under the forget role."""
    roles = ledger["roles"]
    leaks = {}
    for role, r in roles.items():
        if role == "forget" and command != "retrain":
            # the forget role of an unlearning run is where its own forget pairs belong, not earlier ones
            hit = sorted(h for h in r["sha256"] if h in (earlier or {}))
            if hit:
                leaks[role] = [{"pair": earlier[h], "sha256": h, "uses": r["sha256"][h]} for h in hit]
            continue
        hit = sorted(h for h in r["sha256"] if h in forget)
        if hit:
            leaks[role] = [{"pair": forget[h], "sha256": h, "uses": r["sha256"][h]} for h in hit]
    forget_role = roles.get("forget", {"sha256": {}, "keys": {}})
    consumed = set(forget_role["sha256"]) & (set(forget) - set(earlier or {}))
    stray = sorted(k for k in forget_role["keys"] if pair_hash(*k.split("|")) not in forget)
    leak_count = sum(len(v) for v in leaks.values())
    return {
        "roles": {role: {"pairs": r["pairs"], "uses": r["uses"]} for role, r in roles.items()},
        "forget_pairs": len(forget) - len(earlier or {}),
        "forget_pairs_consumed": len(consumed),
        "leaks": leaks,
        "leak_count": leak_count,
        "stray_forget_pairs": stray,
        "passed": leak_count == 0 and not stray,
    }


def summary(result: dict, path: Path, logged: bool) -> str:
    lines = []
    if len(result.get("chain", [])) > 1:
        lines.append(f"lineage of {result['run']}: {len(result['chain'])} steps, oldest first")
        for st in result["chain"][:-1]:
            lines.append(
                f"  step {st['step']} {st['run']} ({st['method']}): {st['forget_pairs']} new forget pairs, "
                f"leaks {st['leak_count']}, {'passed' if st['passed'] else 'FAILED'}"
            )
        lines.append(f"  step {len(result['chain'])} (this run):")
    lines += [
        f"audit {result['run']}: {result['command']}"
        + (f" ({result['method']})" if result.get("method") else "")
        + f", request sha256 {result['request_sha256'][:12]}, {result['forget_pairs']} forget pairs"
    ]
    for role, r in sorted(result["roles"].items()):
        lines.append(f"  {role:<7} {r['pairs']:>7} pairs {r['uses']:>9} uses")
    lines.append(f"  forget pairs consumed by the forget role: {result['forget_pairs_consumed']}")
    lines.append(
        f"  leaks: {result['leak_count']}"
        + (f"  stray forget pairs: {len(result['stray_forget_pairs'])}" if result["stray_forget_pairs"] else "")
    )
    if "chain" in result:
        lines.append(f"  whole lineage: {result['chain_leak_count']} leak(s) over {len(result['chain'])} step(s)")
    lines.append(
        f"  {'passed' if result['passed'] else 'FAILED'}; wrote {path}"
        + ("; logged to MLflow" if logged else " (run not tracked in MLflow)")
    )
    return "\n".join(lines)


def _failures(result: dict) -> str:
    if "chain" in result:
        return "; ".join(
            f"step {st['step']} ({st['run']}): {_failures(st)}" for st in result["chain"] if not st["passed"]
        )
    parts = []
    for role, pairs in result["leaks"].items():
        names = ", ".join(p["pair"] for p in pairs[:SHOWN]) + (", ..." if len(pairs) > SHOWN else "")
        parts.append(f"{len(pairs)} forget pair(s) reached role '{role}': {names}")
    if result["stray_forget_pairs"]:
        stray = result["stray_forget_pairs"]
        parts.append(f"{len(stray)} pair(s) outside the request under role 'forget': {', '.join(stray[:SHOWN])}")
    return "; ".join(parts)


def _final_folder(run: Path) -> Path:
    final = run / "final" if (run / "final").is_dir() else run
    if not (final / "state.json").is_file():
        raise UserError(f"{run}: not a run folder (no final/state.json); pass runs/<dataset>/<name> of a finished run")
    return final


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None


def _checked_ledger(final: Path, state: dict) -> dict:
    path = final / "ledger.json"
    if state.get("ledger_sha256") is None:
        raise UserError(f"{final}/state.json: the run recorded no ledger (a run from before ledger checksums?)")
    if not path.is_file():
        raise UserError(f"{path}: ledger missing")
    if sha256_file(path) != state["ledger_sha256"]:
        raise UserError(f"{path}: sha256 does not match state.json's ledger_sha256 (ledger edited after the run)")
    doc = _json(path)
    if doc.get("format") != FORMAT:
        raise UserError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("request_sha256") != state.get("request_sha256"):
        raise UserError(
            f"{path}: request sha256 {doc.get('request_sha256')} differs from state.json's "
            f"{state.get('request_sha256')}"
        )
    _check_shape(doc, path)
    for role, r in doc["roles"].items():
        if {pair_hash(*k.split("|")): n for k, n in r["keys"].items()} != r["sha256"]:
            raise UserError(f"{path}: role '{role}': hashed keys do not match the plain keys")
    return doc


def _check_shape(doc: dict, path: Path) -> None:
    """roles -> {keys: {instance|task: uses}, sha256: {hash: uses}}: anything else is refused by name, so
    that no check below reads a field that is not there."""
    roles = doc.get("roles")
    if not isinstance(roles, dict):
        raise UserError(f"{path}: field 'roles' must be an object")
    for role, r in roles.items():
        if not (isinstance(r, dict) and isinstance(r.get("keys"), dict) and isinstance(r.get("sha256"), dict)):
            raise UserError(f"{path}: role '{role}' must hold the objects 'keys' and 'sha256'")
        for key, n in r["keys"].items():
            if key.count("|") != 1 or not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise UserError(f"{path}: role '{role}': {key!r}: {n!r} is not an 'instance|task' key with a use count")


def _forget_pairs(request: str | None, state: dict) -> dict[str, str]:
    """sha256 key -> `instance|task` for every pair of the run's request, after checking its sha256."""
    if not state.get("request_sha256"):
        raise UserError(f"{state['_folder']}: a '{state.get('command')}' run has no forget request to audit against")
    path = Path(request or state.get("request_path") or "")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(
            f"{path}: cannot read the run's forget request ({e.strerror or e}); pass --request if it moved"
        ) from None
    if sha256_bytes(data) != state["request_sha256"]:
        raise UserError(
            f"{path}: sha256 {sha256_bytes(data)[:12]}... is not the run's request "
            f"{state['request_sha256'][:12]}... (the file changed since the run)"
        )
    raw = yaml.safe_load(data)  # the run validated these very bytes; only the pairs are needed here
    pairs = {}
    for e in raw["entries"]:
        e = {"id": e} if isinstance(e, str) else e
        for t in e.get("tasks") or state["tasks"]:
            pairs[pair_hash(e["id"], t)] = f"{e['id']}|{t}"
    return pairs


def _mlflow_run(run_id: str | None, tracking_uri: str | None):
    if not run_id:
        return None
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    from mlflow.exceptions import MlflowException

    from mtu_dist.reporting.tracking import mlflow_client

    client = mlflow_client(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"tracking URI {uri}: no MLflow run {run_id}; pass the --tracking-uri the run was logged to"
        ) from None
    return client, run_id

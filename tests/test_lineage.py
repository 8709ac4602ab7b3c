"""Successive forget requests: a lineage of unlearning runs, each on the model the previous one produced.

The chain (module fixture, on the shared tiny original): step 1 a full request r1; step 2 a partial
request r2 that repeats one pair of r1; step 3 a full request drawn with `mtu forget make --from` and
run at 2 real gloo ranks. Besides it: a retrain on the hand-merged r1+r2 (step 2's gold standard), a
request made only of repeats, one for another dataset and one for another lineage root (all refused),
and step 2 again with a deliberate leak of an r1 pair into its retain stream (the audit must catch it).
Every expected set is merged by hand here, not with the package's own merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, read_json, run_many, run_mtu

pytestmark = pytest.mark.slow
TINY = ROOT / "configs" / "tiny.yaml"
TOL = 1e-6  # the same model on the same instances, evaluated in two processes (CPU, deterministic)
TASKS = ("seg", "depth", "normal")


def _common(tiny_root, tmp: Path, uri: str) -> list:
    return [
        "--config",
        TINY,
        "--set",
        f"data.root={tiny_root}",
        "--set",
        "data.dataset=synth-indoor",
        "--set",
        f"out={tmp / 'runs'}",
        "--set",
        "data.workers=1",
        "--tracking-uri",
        uri,
    ]


def _pairs(request: Path) -> set[tuple[str, str]]:
    raw = yaml.safe_load(request.read_text())
    return {(e["id"], t) for e in raw["entries"] for t in e.get("tasks") or TASKS}


def _write(path: Path, setting: str, entries: dict, **extra) -> Path:
    raw = {
        "setting": setting,
        "dataset": extra.pop("dataset", "synth-indoor"),
        **extra,
        "entries": [{"id": i, "tasks": ts} for i, ts in entries.items()],
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _ledger_pairs(run: Path, role: str) -> set[tuple[str, str]]:
    keys = read_json(run / "final" / "ledger.json")["roles"].get(role, {"keys": {}})["keys"]
    return {tuple(k.split("|")) for k in keys}


@pytest.fixture(scope="module")
def chain(tiny_root, tiny_original, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lineage")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = _common(tiny_root, tmp, uri)
    ids = json.loads((tiny_root / "synth-indoor" / "manifest.json").read_text())
    keys = [f"synth-indoor/train/{n:06d}" for n in range(40)]
    assert keys[0] in json.dumps(ids), "the tiny dataset's instance ids changed"
    r1 = _write(tmp / "r1.yaml", "full", {k: list(TASKS) for k in keys[2:6]})
    # r2 repeats r1's (keys[3], seg) and adds seg of two new instances
    r2 = _write(tmp / "r2.yaml", "partial", {keys[3]: ["seg"], keys[10]: ["seg"], keys[11]: ["seg"]})
    merged12 = {**{k: list(TASKS) for k in keys[2:6]}, keys[10]: ["seg"], keys[11]: ["seg"]}
    cum12 = _write(tmp / "cum12.yaml", "mixed", merged12)  # hand-merged r1 + r2
    repeat = _write(tmp / "repeat.yaml", "partial", {keys[2]: ["depth"], keys[4]: ["seg", "normal"]})
    street = _write(
        tmp / "street.yaml", "full", {"synth-street/train/000001": ["seg", "depth"]}, dataset="synth-street"
    )
    other_root = _write(tmp / "other.yaml", "partial", {keys[20]: ["seg"]}, lineage_root="0" * 64)
    runs = tmp / "runs" / "synth-indoor"
    plan = [
        ["unlearn", *common, "--method", "neggrad_plus", "--request", r1, "--from", tiny_original, "--name", "s1"],
        ["retrain", *common, "--request", cum12, "--name", "rt12"],
        [
            "unlearn",
            *common,
            "--method",
            "scrub",
            "--request",
            r2,
            "--from",
            runs / "s1",
            "--name",
            "s2",
            "--retrain",
            runs / "rt12",
        ],
        ["unlearn", *common, "--method", "finetune", "--request", repeat, "--from", runs / "s2", "--name", "repeat"],
        ["unlearn", *common, "--method", "finetune", "--request", street, "--from", runs / "s2", "--name", "street"],
        ["unlearn", *common, "--method", "finetune", "--request", other_root, "--from", runs / "s2", "--name", "other"],
    ]
    status = run_many(plan, tmp, check=False)
    for name in ("s1", "rt12", "s2"):
        assert status[name]["rc"] == 0, status[name].get("error", status["_proc"].stderr[-3000:])
    r3 = tmp / "r3.yaml"
    run_mtu(
        "forget",
        "make",
        "--dataset",
        "synth-indoor",
        "--root",
        tiny_root,
        "--fraction",
        0.1,
        "--setting",
        "full",
        "--seed",
        3,
        "--from",
        runs / "s2",
        "--out",
        r3,
        check=True,
    )
    run_many(
        [["unlearn", *common, "--method", "neggrad_plus", "--request", r3, "--from", runs / "s2", "--name", "s3"]],
        tmp,
        nproc=2,
        tag="s3",
    )
    leak_pair = f"{keys[2]}|seg"  # forgotten by r1; leaked into step 2's retain stream
    leak = run_mtu(
        "unlearn",
        *common,
        "--method",
        "scrub",
        "--request",
        r2,
        "--from",
        runs / "s1",
        "--name",
        "leaky",
        cwd=tmp,
        env={"MTU_TEST_LEAK": leak_pair},
        check=True,
    )
    return {
        "tmp": tmp,
        "uri": uri,
        "runs": runs,
        "r1": r1,
        "r2": r2,
        "r3": r3,
        "cum12": cum12,
        "status": status,
        "proc": status["_proc"],
        "leak": leak,
        "leak_pair": leak_pair,
        "keys": keys,
        "original": tiny_original,
    }


def test_lineage_round_trip(chain):
    """`mtu lineage` traces s3 back to the original through every request, and its cumulative set (and the
    request file it writes) is r1 + r2 + r3 merged by hand."""
    from mtu_dist.utils.fileio import sha256_file

    runs, tmp = chain["runs"], chain["tmp"]
    out = tmp / "cumulative.json"
    proc = run_mtu("lineage", runs / "s3", "--json", "--write-request", out, cwd=tmp, check=True)
    doc = json.loads(proc.stdout)
    models = {
        name: read_json(runs / name / "final" / "state.json")["sha256"]["model.safetensors"]
        for name in ("s1", "s2", "s3")
    }
    original = read_json(chain["original"] / "final" / "state.json")["sha256"]["model.safetensors"]
    assert doc["root"]["model_sha256"] == original and doc["root"]["command"] == "train"
    assert [s["parent_sha256"] for s in doc["steps"]] == [original, models["s1"], models["s2"]]
    assert [s["request_sha256"] for s in doc["steps"]] == [sha256_file(chain[r]) for r in ("r1", "r2", "r3")]
    assert [s["status"] for s in doc["steps"]] == ["ok"] * 3
    expected = _pairs(chain["r1"]) | _pairs(chain["r2"]) | _pairs(chain["r3"])
    got = {(i, t) for i, ts in doc["cumulative"]["entries"].items() for t in ts}
    assert got == expected and doc["cumulative"]["pairs"] == len(expected)
    assert _pairs(out) == expected
    assert (
        sha256_file(out)
        == doc["cumulative"]["sha256"]
        == read_json(runs / "s3" / "final" / "metrics.json")["cumulative"]["request_sha256"]
    )
    # `forget make --from` named the lineage and drew no instance it had forgotten already
    r3 = yaml.safe_load(chain["r3"].read_text())
    assert r3["lineage_root"] == original
    assert not {e["id"] for e in r3["entries"]} & {i for i, _ in _pairs(chain["r1"]) | _pairs(chain["r2"])}


def test_written_cumulative_request_loads(chain, tiny_root):
    tmp = chain["tmp"]
    out = tmp / "cumulative-s2.json"
    run_mtu("lineage", chain["runs"] / "s2", "--write-request", out, cwd=tmp, check=True)
    p = run_mtu("forget", "check", out, "--dataset", "synth-indoor", "--root", tiny_root, cwd=tmp, check=True)
    assert "mixed request" in p.stdout and f"{len(_pairs(chain['cum12']))} (instance, task) pairs" in p.stdout
    # the same pairs as the hand-merged file the retrain used, so that retrain is this chain's gold standard
    assert _pairs(out) == _pairs(chain["cum12"])


def test_repeated_pairs_are_reported_and_skipped(chain, tiny_root):
    from mlflow import MlflowClient

    runs, keys = chain["runs"], chain["keys"]
    repeated = f"{keys[3]}|seg"
    assert (
        f"1 pair(s) were already forgotten earlier in this lineage and are skipped: {repeated}" in chain["proc"].stdout
    )
    step = read_json(runs / "s2" / "final" / "state.json")["lineage"]["steps"][-1]
    assert step["skipped"] == [repeated] and step["new"] == {keys[10]: ["seg"], keys[11]: ["seg"]}
    # not ascended again: step 2's forget stream held the new pairs only
    assert _ledger_pairs(runs / "s2", "forget") == {(keys[10], "seg"), (keys[11], "seg")}
    run_id = read_json(runs / "s2" / "final" / "metrics.json")["run"]["mlflow_run_id"]
    metrics = MlflowClient(chain["uri"]).get_run(run_id).data.metrics
    assert metrics["lineage/skipped_pairs"] == 1 and metrics["lineage/new_pairs"] == 2
    assert metrics["lineage/depth"] == 2 and metrics["lineage/cumulative_pairs"] == 14
    # `forget check --from` says the same before anything runs
    p = run_mtu(
        "forget",
        "check",
        chain["r2"],
        "--dataset",
        "synth-indoor",
        "--root",
        tiny_root,
        "--from",
        runs / "s1",
        check=True,
    )
    assert f"(step 2): 2 new pair(s), 1 already forgotten (would be skipped): {repeated}" in p.stdout
    # a request made only of repeats is refused before any work
    assert chain["status"]["repeat"]["rc"] == 2 and not (runs / "repeat").exists()
    assert "every one of its 3 pair(s) was already forgotten earlier in this lineage" in chain["proc"].stderr


def test_other_dataset_or_lineage_is_an_error(chain):
    status, err = chain["status"], chain["proc"].stderr
    assert status["street"]["rc"] == 2 and status["other"]["rc"] == 2
    assert "request is for dataset 'synth-street', but the data is 'synth-indoor'" in err
    assert "field 'lineage_root' is 000000000000..." in err and "this request is for another model lineage" in err
    assert not (chain["runs"] / "street").exists() and not (chain["runs"] / "other").exists()
    assert "Traceback" not in err


def test_later_steps_never_see_earlier_pairs(chain):
    """Read from each step's own ledger (not through the audit): no retain or borrowed-target pair is in the
    cumulative forget set up to that step, and no forget pair was forgotten by an earlier step. Then the
    chain-wide audit passes, and catches a deliberate leak of an r1 pair into step 2."""
    runs = chain["runs"]
    requests = [_pairs(chain[r]) for r in ("r1", "r2", "r3")]
    earlier: set = set()
    for _n, (name, request) in enumerate(zip(("s1", "s2", "s3"), requests), 1):
        cumulative = earlier | request
        for role in ("retain", "target"):
            assert not _ledger_pairs(runs / name, role) & cumulative, (name, role)
        forgot = _ledger_pairs(runs / name, "forget")
        assert forgot and forgot <= request - earlier, name
        assert len(_ledger_pairs(runs / name, "retain")) > 0
        earlier = cumulative
    proc = run_mtu("audit", runs / "s3", "--tracking-uri", chain["uri"], cwd=chain["tmp"], check=True)
    audit = read_json(runs / "s3" / "final" / "audit.json")
    assert audit["passed"] and audit["chain_leak_count"] == 0 and [s["step"] for s in audit["chain"]] == [1, 2, 3]
    assert "whole lineage: 0 leak(s) over 3 step(s)" in proc.stdout

    pair = chain["leak_pair"]
    assert f"forget pair {pair} is deliberately left in the retain stream" in chain["leak"].stderr
    leaky = runs / "leaky"
    assert tuple(pair.split("|")) in _ledger_pairs(leaky, "retain")  # the leak really reached the loop
    proc = run_mtu("audit", leaky, "--tracking-uri", chain["uri"], cwd=chain["tmp"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"step 2 ({leaky}): 1 forget pair(s) reached role 'retain': {pair}" in proc.stderr
    audit = read_json(leaky / "final" / "audit.json")
    assert not audit["passed"] and audit["chain"][0]["passed"] and not audit["chain"][1]["passed"]


def test_cumulative_metrics_equal_hand_merged(chain):
    """Step 2's cumulative block = its evaluation on the hand-merged r1 + r2 (`mtu eval`), scored by hand
    against the original's evaluation on it and the retrain on its retain signal."""
    from mtu_dist.evaluation.unlearning_metrics import gap_to_retrain, uis

    runs, tmp, cum12 = chain["runs"], chain["tmp"], chain["cum12"]
    report = read_json(runs / "s2" / "final" / "metrics.json")
    cum = report["cumulative"]
    assert cum["depth"] == 2 and cum["pairs"] == len(_pairs(cum12)) and not cum["same_as_request"]
    for ckpt in (runs / "s2", chain["original"]):  # the same eval config (tiny.yaml: eval.retain_sample 16)
        run_mtu(
            "eval",
            "--config",
            TINY,
            "--ckpt",
            ckpt,
            "--request",
            cum12,
            "--tracking-uri",
            chain["uri"],
            cwd=tmp,
            check=True,
        )
    from mtu_dist.utils.fileio import sha256_file

    sha12 = sha256_file(cum12)[:12]
    mine = read_json(runs / "s2" / "final" / f"metrics-{sha12}.json")["splits"]
    original = read_json(chain["original"] / "final" / f"metrics-{sha12}.json")["splits"]
    assert set(mine) == set(cum["splits"]) == {"forget", "forget_kept", "retain", "val"}
    for sp, tasks in mine.items():
        for t, mets in tasks.items():
            for k, v in mets.items():
                assert cum["splits"][sp][t][k] == pytest.approx(v, rel=TOL, abs=TOL), (sp, t, k)
    block = cum["unlearning"]
    assert block["uis"]["mean"] == pytest.approx(
        uis(original, mine, "partial", ["seg", "depth", "normal"])["mean"], rel=TOL
    )
    retrain = read_json(runs / "rt12" / "final" / "metrics.json")["splits"]
    assert block["gap_retrain"] == pytest.approx(gap_to_retrain(mine, retrain)["mean"], rel=TOL)
    steps = read_json(runs / "s2" / "final" / "state.json")["lineage"]["steps"]
    assert cum["cost_s"] == pytest.approx(sum(s["cost_s"] for s in steps), rel=TOL)
    assert block["cost_ratio"] == pytest.approx(
        cum["cost_s"] / read_json(runs / "rt12" / "final" / "metrics.json")["time_s"], rel=TOL
    )
    # per request: r2 as filed (its repeated pair included), against step 1's model
    assert report["unlearning"]["references"]["original"] == str(runs / "s1" / "final")
    assert set(report["splits"]["forget"]) == {"seg"} and report["unlearning"]["gap_retrain"] is None


def test_chain_is_nested_in_mlflow(chain):
    from mlflow import MlflowClient

    client, runs = MlflowClient(chain["uri"]), chain["runs"]
    ids = {n: read_json(runs / n / "final" / "metrics.json")["run"]["mlflow_run_id"] for n in ("s1", "s2", "s3")}
    tags = {n: client.get_run(i).data.tags for n, i in ids.items()}
    assert "mlflow.parentRunId" not in tags["s1"]
    assert tags["s2"]["mlflow.parentRunId"] == ids["s1"] and tags["s3"]["mlflow.parentRunId"] == ids["s2"]
    assert tags["s3"]["mtu.lineage.depth"] == "3"
    metrics = client.get_run(ids["s3"]).data.metrics
    assert {"cumulative/uis", "cumulative/mia_auc", "uis", "lineage/cumulative_pairs"} <= set(metrics)
    # a first step's cumulative set is its request: its scores are not logged twice (metrics.json keeps them)
    first = client.get_run(ids["s1"]).data.metrics
    assert "uis" in first and not [k for k in first if k.startswith(("cumulative/", "lineage/"))]
    assert read_json(runs / "s1" / "final" / "metrics.json")["cumulative"]["depth"] == 1
    # s3 ran at 2 ranks: its cumulative block is there too, and `mtu score` recomputes it from the files alone
    report = read_json(runs / "s3" / "final" / "metrics.json")
    assert report["run"]["world_size"] == 2 and report["cumulative"]["depth"] == 3
    before = report["cumulative"]["unlearning"]
    run_mtu("score", runs / "s3", "--tracking-uri", chain["uri"], cwd=chain["tmp"], check=True)
    after = read_json(runs / "s3" / "final" / "metrics.json")["cumulative"]["unlearning"]
    assert before["uis"] is not None and after["uis"]["mean"] == pytest.approx(before["uis"]["mean"], rel=TOL)
    assert after["mia_auc"] == pytest.approx(before["mia_auc"], rel=TOL)


def test_quick_benchmark_writes_tables_and_plot(tmp_path):
    """bench/lineage.py --quick end to end: every (method, k) row, the costs as the sums they claim to be."""
    import math
    import subprocess
    import sys

    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, ROOT / "bench" / "lineage.py", "--quick", "--out", out],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_json(out / "lineage.json")["rows"]
    assert sorted((r["method"], r["k"]) for r in rows) == sorted(
        (m, k) for m in ("retrain", "neggrad_plus", "iamu") for k in (1, 2)
    )
    per_request = 2 * 3  # 5% of 40 instances, full setting (3 tasks), disjoint draws
    retrain_s = {r["k"]: r["cost_s"] for r in rows if r["method"] == "retrain"}
    for r in rows:
        assert math.isfinite(r["uis"]) and math.isfinite(r["mia_auc"]), r
        if r["method"] != "retrain":
            assert r["pairs"] == per_request * r["k"]
            assert r["cost_over_retrains"] == pytest.approx(
                r["cost_s"] / sum(retrain_s[k] for k in range(1, r["k"] + 1))
            )
    chain = [r["cost_s"] for r in sorted(rows, key=lambda r: r["k"]) if r["method"] == "iamu"]
    assert chain[1] > chain[0]  # the chain's cost accumulates
    assert (out / "uis_vs_requests.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cumulative UIS" in (out / "lineage.md").read_text() and "| iamu |" in proc.stdout

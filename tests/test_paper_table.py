"""The paper-style benchmark end to end (`bench/paper_table.py --quick`), `mtu report` and `mtu tune`.

One quick benchmark (tiny data, 1 seed, 2 trials per method, two worker processes sharing one
sqlite MLflow store) is run once for the module; a second invocation adds an evaluation seed, which
must reuse every tuning trial (the tuned configs do not depend on the evaluation request) and skip
every finished run. The search-space and selection tests at the bottom are pure and fast.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import yaml
from conftest import BIN, ROOT, run_mtu

from mtu_dist.errors import UserError
from mtu_dist.methods import METHODS
from mtu_dist.studies.tune import criterion, load_space, sample, select

ENV = {"OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def _bench(out, *extra):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "paper_table.py"), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**__import__("os").environ, **ENV},
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _client(out):
    from mlflow import MlflowClient

    rec = json.loads((out / "paper_table.json").read_text())
    return MlflowClient(rec["tracking_uri"]), rec["parent_run_id"]


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "bench"
    first = _bench(out)
    tuned = {p.name: p.read_bytes() for p in sorted(out.glob("tune/*/tuned.yaml"))}
    runs_after_first = len(_children(*_client(out)))
    second = _bench(out, "--seeds", "0", "1", "--settings", "full")
    return out, first, second, tuned, runs_after_first


@pytest.mark.slow
def test_report_table_goals_and_plots(bench, tmp_path):
    out, first, *_ = bench
    proc = run_mtu("report", "--bench", out, "--out", tmp_path / "rep", check=True)
    text = proc.stdout
    for name in [*METHODS, "original (before)", "retrain (reference)"]:  # the references are marked, not ranked
        assert f"| {name} |" in text, f"row {name} missing from the table"
    assert "UIS ↓" in text and "val seg mIoU (0–1) ↑" in text and "forget seg mIoU (0–1) ≈R" in text
    assert "bold: the best value of its column" in text and "**" in text
    assert "## synth-indoor, full-task (seeds 0, 1" in text and "## synth-indoor, partial-task (seeds 0;" in text
    full = text.split("## synth-indoor, full-task")[1].split("## synth-indoor, partial-task")[0]
    # two seeds in the full setting: every method's UIS cell is a mean with its 95% interval
    for name in METHODS:
        row = next(ln for ln in full.splitlines() if ln.startswith(f"| {name} |") or ln.startswith(f"| {name} (below"))
        assert row.count(" [") >= 5, row
    assert "UIS excess" in text
    assert "iamu mean UIS" in text and "strongest baseline" in text and "paired difference iamu - " in text
    assert "MIA AUC" in text and "vs retrain" in text and "kept tasks" in text
    # equal forgetting (from the curve runs of seed 0) and the memorisation figures, per unit
    assert text.count("Interference at equal forgetting") == 2 and "| iamu | " in full.split("equal forgetting")[1]
    assert text.count("Memorisation of the original") == 2 and "MIA AUC (target tasks), retrain" in text
    assert "feasible trials on the dev request" in text
    assert re.search(r"\| iamu \| [012]/2[^|]* \| [012]/2", text), "per unit: feasible trials out of 2"
    for png in ("uis.png", "tradeoff.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
    from PIL import Image

    assert Image.open(tmp_path / "rep" / "uis.png").size[0] > 200
    # the trade-off plot: one row of two panels (task-level, instance-level) per benchmark x setting
    w, h = Image.open(tmp_path / "rep" / "tradeoff.png").size
    assert w > 1000 and h > 700
    client, parent = _client(out)
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/table.md", "report/uis.png", "report/tradeoff.png"} <= artifacts
    assert "## Goals" in first  # the benchmark prints the report at its end


@pytest.mark.slow
def test_one_parent_with_every_run_as_child(bench):
    out, *_ = bench
    client, parent = _client(out)
    runs = _children(client, parent)
    roles = {}
    for r in runs:
        roles.setdefault(
            r.data.tags.get("mtu.paper.role") or ("trial" if "mtu.tune.method" in r.data.tags else "?"), []
        ).append(r)
    assert set(roles) == {"train", "original", "retrain", "method", "curve", "trial"}, set(roles)
    # 12 methods x 2 settings x 2 trials; then seeds {0, 1} in full and {0} in partial; curves: seed 0
    assert len(roles["trial"]) == len(METHODS) * 2 * 2
    assert len(roles["method"]) == len(METHODS) * 3
    assert len(roles["curve"]) == len(METHODS) * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    # the original's row is an evaluation (`mtu eval --retrain`), not an unlearning run
    originals = [r for r in roles["original"]]
    assert all(r.data.tags.get("mtu.command") == "eval" for r in originals) and all(
        "uis" in r.data.metrics for r in originals
    )
    # the retrain scored itself (`mtu retrain --original`): its UIS is the floor, its excess 0
    for r in roles["retrain"]:
        assert r.data.metrics["uis_excess"] == 0.0 and r.data.metrics["uis_retrain"] == r.data.metrics["uis"]
    # every curve run stopped at (or ran its budget toward) the retrain's forget level, with a trajectory
    for r in roles["curve"]:
        assert "eqf/max_progress" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "traj/progress")) >= 2


@pytest.mark.slow
def test_every_method_gets_the_same_number_of_trials(bench):
    out, *_ = bench
    for folder in out.glob("tune/*"):
        counts = {m: len(list((folder / "trials").glob(f"{m}-t*.json"))) for m in METHODS}
        assert set(counts.values()) == {2}, counts
        tuned = yaml.safe_load((folder / "tuned.yaml").read_text())
        assert set(tuned["methods"]) == set(METHODS)
        for m, entry in tuned["methods"].items():  # the chosen trial is one of the method's own trials
            rec = json.loads((folder / "trials" / f"{m}-t{entry['trial']:02d}.json").read_text())
            assert rec["mlflow_run_id"] == entry["mlflow_run_id"]
            assert rec["request_sha256"] == tuned["request_sha256"]  # the dev request


@pytest.mark.slow
def test_new_evaluation_request_reuses_tuning_and_skips_finished_runs(bench):
    out, first, second, tuned, runs_after_first = bench
    log = (out / "logs" / "synth-indoor-full.log").read_text()
    # the evaluation request of seed 1 is new: the tuned configs are byte-identical, no trial reran
    assert {p.name: p.read_bytes() for p in sorted(out.glob("tune/*/tuned.yaml"))} == tuned
    assert "trial 2/2: ran" not in log and "trial 1/2: skipped (finished)" in log
    assert "synth-indoor-original: skipped (finished)" in second
    assert f"{len(METHODS) + 2} runs made, {2 * len(METHODS) + 3} skipped" in log  # seed 0 rows and curves + original
    # only seed 1's rows were added: retrain, original row, every method
    assert len(_children(*_client(out))) == runs_after_first + len(METHODS) + 2
    assert (out / "runs/synth-indoor/iamu-full-s1/final/metrics.json").is_file()


@pytest.mark.slow
def test_mtu_tune_command(bench, tmp_path):
    """`mtu tune` on its own: a parent run with one child per trial, tuned.yaml for the methods asked."""
    out, *_ = bench
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "trials": 2,
                "seed": 3,
                "criterion": {"forget_tolerance": 0.1},
                "fixed": {"unlearn.stop_band": 0.0, "unlearn.steps": 3},
                "common": {"unlearn.lr": {"log_uniform": [0.001, 0.005]}},
                "methods": {"grad_ascent": {}, "neggrad_plus": {"unlearn.alpha": {"uniform": [0.3, 0.9]}}},
            }
        )
    )
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # two `mtu tune` processes, one method each, sharing one --out: neither loses the other's entry
    procs = [
        subprocess.Popen(
            [
                str(BIN / "mtu"),
                "tune",
                "--request",
                str(out / "requests/synth-indoor-full-dev.yaml"),
                "--from",
                str(out / "runs/synth-indoor/original"),
                "--methods",
                m,
                "--space",
                str(space),
                "--out",
                str(tmp_path / "tune"),
                "--set",
                "data.workers=0",
                "--set",
                "eval.retain_sample=8",
                "--tracking-uri",
                db,
            ],
            cwd=tmp_path,
            env={**__import__("os").environ, **ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in ("grad_ascent", "neggrad_plus")
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "| grad_ascent |" in outs[0][0] and "| neggrad_plus |" in outs[1][0] and "feasible trials" in outs[0][0]
    tuned = yaml.safe_load((tmp_path / "tune/tuned.yaml").read_text())
    assert set(tuned["methods"]) == {"grad_ascent", "neggrad_plus"}
    assert "unlearn.stop_band=0.0" in tuned["methods"]["neggrad_plus"]["set"]
    assert (
        tuned["methods"]["neggrad_plus"]["trials"] == 2
        and 0 <= tuned["methods"]["neggrad_plus"]["feasible_trials"] <= 2
    )
    from mlflow import MlflowClient

    client = MlflowClient(db)
    exp = client.get_experiment_by_name("synth-indoor")
    parents = client.search_runs([exp.experiment_id], "tags.`mtu.command` = 'tune'")
    assert len(parents) == 2 and sum(len(_children(client, p.info.run_id)) for p in parents) == 4
    # trial runs are named for the request's dataset and setting as well: unique across tuning jobs
    names = sorted(c.info.run_name for p in parents for c in _children(client, p.info.run_id))
    assert names == [f"tune-synth-indoor-full-{m}-t{i:02d}" for m in ("grad_ascent", "neggrad_plus") for i in (0, 1)]
    # `mtu unlearn --tuned`: the chosen knobs reach the run, a --set item still wins over them
    chosen = dict(x.split("=", 1) for x in tuned["methods"]["neggrad_plus"]["set"])
    run_mtu(
        "unlearn",
        "--request",
        out / "requests/synth-indoor-full-s0.yaml",
        "--from",
        out / "runs/synth-indoor/original",
        "--method",
        "neggrad_plus",
        "--tuned",
        tmp_path / "tune/tuned.yaml",
        "--set",
        "unlearn.steps=1",
        "--set",
        f"out={tmp_path / 'runs'}",
        "--set",
        "data.workers=0",
        "--set",
        "eval.retain_sample=8",
        "--name",
        "tuned",
        "--tracking-uri",
        db,
        cwd=tmp_path,
        env=ENV,
        check=True,
    )
    resolved = yaml.safe_load((tmp_path / "runs/synth-indoor/tuned/config.yaml").read_text())["unlearn"]
    assert resolved["lr"] == float(chosen["unlearn.lr"]) and resolved["alpha"] == float(chosen["unlearn.alpha"])
    assert resolved["steps"] == 1 and resolved["method"] == "neggrad_plus"
    bad = run_mtu(
        "unlearn",
        "--request",
        out / "requests/synth-indoor-full-s0.yaml",
        "--from",
        out / "runs/synth-indoor/original",
        "--method",
        "scrub",
        "--tuned",
        tmp_path / "tune/tuned.yaml",
        cwd=tmp_path,
        env=ENV,
    )
    assert bad.returncode == 2 and "no tuned config for method 'scrub'" in bad.stderr and "Traceback" not in bad.stderr
    # the space changes (a fixed setting): the trials run again, scored against the original like the first time
    raw = yaml.safe_load(space.read_text())
    raw["fixed"]["unlearn.steps"] = 2
    space.write_text(yaml.safe_dump(raw))
    before = {i: json.loads((tmp_path / f"tune/trials/grad_ascent-t{i:02d}.json").read_text()) for i in (0, 1)}
    run_mtu(
        "tune",
        "--request",
        out / "requests/synth-indoor-full-dev.yaml",
        "--from",
        out / "runs/synth-indoor/original",
        "--methods",
        "grad_ascent",
        "--space",
        space,
        "--out",
        tmp_path / "tune",
        "--set",
        "data.workers=0",
        "--set",
        "eval.retain_sample=8",
        "--tracking-uri",
        db,
        cwd=tmp_path,
        env=ENV,
        check=True,
    )
    for i in (0, 1):
        rec = json.loads((tmp_path / f"tune/trials/grad_ascent-t{i:02d}.json").read_text())
        assert rec["spec_sha256"] != before[i]["spec_sha256"]  # it ran again
        # scored against the original: its damage is defined (against nothing, it would be inf). The quick
        # original's val depth is 0, so its forget gap stays undefined (inf) by design
        assert math.isfinite(rec["damage"]), rec


# --------------------------------------------------------------------------
# search space and selection (pure)
# --------------------------------------------------------------------------


def test_space_gives_every_method_the_same_trial_count():
    space = load_space()
    assert set(space.methods) == set(METHODS), "configs/tune_space.yaml must cover every registered method"
    plans = {m: sample(space, m) for m in METHODS}
    assert {len(p) for p in plans.values()} == {space.trials}
    assert sample(space, "iamu") == plans["iamu"]  # seeded: the same trials every time
    lo, hi = space.knobs("iamu")["unlearn.lr"]["log_uniform"]  # a method's own range over the common one
    assert space.knobs("pcgrad")["unlearn.lr"] == space.common["unlearn.lr"]  # no range of its own: the common
    lrs = sorted(t["unlearn.lr"] for t in plans["iamu"])
    assert all(lo * 0.99 <= x <= hi * 1.01 for x in lrs)
    # Latin hypercube: one draw per stratum of the log range
    import math

    strata = sorted(
        int((math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo)) * space.trials * 0.9999) for x in lrs
    )
    assert strata == list(range(space.trials))


def test_constant_step_space_covers_every_method_with_a_constant_step():
    """configs/tune_space_constant.yaml: the default space's tuning with the ramp off and a longer budget;
    every registered method has its own decade of step size (none falls back to the common range)."""
    space = load_space(ROOT / "configs" / "tune_space_constant.yaml")
    ramp = load_space()
    assert set(space.methods) == set(METHODS)
    assert space.fixed["unlearn.lr_growth"] == 1.0 and ramp.fixed["unlearn.lr_growth"] > 1.0
    assert space.fixed["unlearn.steps"] > ramp.fixed["unlearn.steps"]
    assert (space.trials, space.tolerance) == (ramp.trials, ramp.tolerance)  # the same tuning otherwise
    for m in METHODS:
        lo, hi = space.knobs(m)["unlearn.lr"]["log_uniform"]
        assert hi / lo == pytest.approx(10), m


def test_equal_forgetting_runs_options(tmp_path):
    """--trajectory-every sets the curve runs' trajectory spacing (default: the size's, 1), --curve-seeds
    which seeds get them."""
    sys.path.insert(0, str(ROOT / "bench"))
    import paper_table

    def bench(*argv):
        args = paper_table.parser().parse_args(["--out", str(tmp_path), *argv])
        return paper_table.Bench(args, paper_table.SIZES["default"])

    def spacing(*argv):
        b = bench(*argv)
        cfg = b.cfg("synth-indoor", b.curve_sets({"seg": 0.4}))
        return cfg.unlearn.trajectory_every, cfg.unlearn.stop_at

    assert spacing() == (1, {"seg": 0.4})
    assert spacing("--trajectory-every", "10") == (10, {"seg": 0.4})
    # --curve-seeds: how many of the first seeds get them (default: the size's 2)
    assert bench("--seeds", "3", "1", "4").curve_seeds == [3, 1]
    assert bench("--seeds", "3", "1", "4", "--curve-seeds", "1").curve_seeds == [3]


def test_space_refuses_a_tuned_step_budget(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "trials": 2,
                "criterion": {"forget_tolerance": 0.1},
                "common": {"unlearn.steps": {"choice": [30, 60]}},
                "methods": {"iamu": {}},
            }
        )
    )
    with pytest.raises(UserError, match=r"common.unlearn.steps.*not tuned.*fixed"):
        load_space(bad)
    assert "unlearn.steps" in load_space().fixed  # the default space: one generous budget for all


def test_space_errors_name_the_field(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "trials": 2,
                "criterion": {"forget_tolerance": 0.1},
                "methods": {
                    "iamu": {
                        "unlearn.options.energy": {"uniform": [0.9, 0.99]},
                        "unlearn.options.mode": {"choice": ["onto_own"]},
                    }
                },
            }
        )
    )
    with pytest.raises(UserError, match=r"methods.iamu.*at most one method-specific knob"):
        load_space(bad)
    bad.write_text(
        yaml.safe_dump(
            {
                "trials": 2,
                "criterion": {"forget_tolerance": 0.1},
                "methods": {"iamu": {"unlearn.lr": {"normal": [0, 1]}}},
            }
        )
    )
    with pytest.raises(UserError, match=r"methods.iamu.unlearn.lr"):
        load_space(bad)
    bad.write_text(yaml.safe_dump({"trials": 2, "criterion": {"forget_tolerance": 0.1}, "methods": {"iamu": {}}}))
    with pytest.raises(UserError, match="no search space for method 'scrub'"):
        load_space(bad).knobs("scrub")


def _splits(forget: float, val: float, retain: float) -> dict:
    return {"forget": {"seg": {"miou": forget}}, "val": {"seg": {"miou": val}}, "retain": {"seg": {"miou": retain}}}


def test_criterion_and_selection():
    original = _splits(forget=0.60, val=0.40, retain=0.62)
    reached_costly = criterion(original, _splits(0.41, 0.30, 0.50), 0.1)  # forgot, big damage
    reached_cheap = criterion(original, _splits(0.43, 0.39, 0.60), 0.1)  # forgot, little damage
    not_reached = criterion(original, _splits(0.58, 0.40, 0.62), 0.1)  # no damage, no forgetting
    assert reached_cheap["feasible"] and reached_costly["feasible"] and not not_reached["feasible"]
    assert reached_cheap["forget_gap"] == pytest.approx(0.03 / 0.40)
    # val, retain, and the overshoot group (0: the forget pairs are not below the val level)
    assert reached_cheap["damage"] == pytest.approx((0.01 / 0.40 + 0.02 / 0.62 + 0) / 3)
    records = [{"trial": i, **c} for i, c in enumerate([not_reached, reached_costly, reached_cheap])]
    assert select(records)["trial"] == 2
    assert select(records[:1])["trial"] == 0  # nothing reached: the least forget gap


def test_overshoot_reaches_the_target_but_costs_like_collateral():
    """Reaching is one-sided: forget pairs far below the val level have forgotten (feasible, gap 0),
    and the part of the fall beyond the tolerance is damage, so a trial that lands at the level with
    the same collateral is chosen over it."""
    original = _splits(forget=0.60, val=0.40, retain=0.62)
    overshoot = criterion(original, _splits(0.10, 0.39, 0.60), 0.1)  # 75% below the val level
    landed = criterion(original, _splits(0.38, 0.39, 0.60), 0.1)  # 5% below: within the tolerance
    assert overshoot["feasible"] and overshoot["forget_gap"] == 0.0
    collateral = (0.01 / 0.40 + 0.02 / 0.62) / 3
    assert overshoot["damage"] == pytest.approx(collateral + (0.75 - 0.1) / 3)
    assert landed["damage"] == pytest.approx(collateral)
    records = [{"trial": i, **c} for i, c in enumerate([overshoot, landed])]
    assert select(records)["trial"] == 1


@pytest.mark.slow
def test_knob_sweep_runs_matched_knobs_on_the_tables_requests(bench, tmp_path):
    """bench/knob_sweep.py: two methods at the same fixed knobs on the table's evaluation request;
    a variant's knob really reaches the run, and a run with the tuned knobs reproduces the table's UIS."""
    out, *_ = bench
    tuned = yaml.safe_load((out / "tune/synth-indoor-full/tuned.yaml").read_text())["methods"]["iamu"]["set"]
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "knob_sweep.py"),
        "--quick",
        "--table",
        str(out),
        "--out",
        str(sweep),
        "--seeds",
        "0",
    ]

    def sweep_run(*args):
        proc = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=600, env={**__import__("os").environ, **ENV}
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    sweep_run("--methods", "iamu", "grad_ascent", "--variant", "steps1:unlearn.steps=1,unlearn.lr=0.001")
    stdout = sweep_run("--methods", "iamu", "--variant", "tuned:" + ",".join(tuned))  # appends to results.jsonl
    rows = [json.loads(x) for x in (sweep / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["variant"]) for r in rows] == [
        ("iamu", "steps1"),
        ("grad_ascent", "steps1"),
        ("iamu", "tuned"),
    ]
    for m in ("iamu", "grad_ascent"):  # the variant's knobs reached the run
        resolved = yaml.safe_load((sweep / f"synth-indoor/{m}-steps1-full-s0/config.yaml").read_text())
        assert resolved["unlearn"]["steps"] == 1 and resolved["unlearn"]["lr"] == 0.001
    table = json.loads((out / "runs/synth-indoor/iamu-full-s0/final/metrics.json").read_text())["unlearning"]
    assert rows[2]["uis"] == pytest.approx(table["uis"]["mean"], abs=1e-9)  # deterministic: same knobs, same numbers
    assert (
        "| synth-indoor | full | iamu | tuned | 1 |" in stdout
        and "| synth-indoor | full | grad_ascent | steps1 | 1 |" in stdout
    )
    bad = subprocess.run(
        [*cmd, "--methods", "grad_ascent", "--variant", "t:" + ",".join(tuned)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # iamu's energy knob is not grad_ascent's
    assert bad.returncode == 2 and "unlearn.options.energy" in bad.stderr and "Traceback" not in bad.stderr


def test_knob_sweep_kept_move_is_the_largest_kept_task_move():
    sys.path.insert(0, str(ROOT / "bench"))
    from knob_sweep import kept_move

    o = {
        "forget_kept": {"depth": {"delta1": 0.8}, "normal": {"within_30": 50.0}},
        "val": {"seg": {"miou": 0.5}, "depth": {"delta1": 0.6}, "normal": {"within_30": 40.0}},
    }
    u = {
        "forget_kept": {"depth": {"delta1": 0.78}, "normal": {"within_30": 49.0}},
        "val": {"seg": {"miou": 0.1}, "depth": {"delta1": 0.63}, "normal": {"within_30": 40.0}},
    }
    assert kept_move(o, u, ["seg"]) == pytest.approx(0.05)  # val depth: 0.03 / 0.6; the target seg is ignored
    assert kept_move(o, u, ["seg", "depth", "normal"]) is None  # full setting: no kept task


def test_a_runs_record_hashes_its_methods_resolved_options(tmp_path):
    """A finished trial is skipped only if it would run the same: the spec holds the method's options with
    its defaults filled in, so spelling a default out is the same run, and a changed option (or a changed
    default, or an ablation's switch) is another."""
    from mtu_dist.config import load_config
    from mtu_dist.methods import resolved_options
    from mtu_dist.studies.tune import _spec_sha

    def sha(*sets):
        return _spec_sha(None, load_config(overrides=["unlearn.method=iamu", *sets]), "r", "o")

    default_energy = resolved_options("iamu", {})["energy"]
    assert sha() == sha(f"unlearn.options.energy={default_energy}")
    assert sha() != sha("unlearn.options.energy=0.5")
    assert resolved_options("iamu_no_proj", {})["project"] is False
    assert resolved_options("iamu", {})["project"] is True


@pytest.mark.slow
def test_method_set_makes_a_variant_of_the_named_methods_only(tmp_path):
    """`--method-set` reaches the named method's tuning trials and evaluation runs, and nothing else."""
    out = tmp_path / "bench"
    _bench(out, "--methods", "iamu", "--settings", "full", "--method-set", "unlearn.options.focus=1.5")
    runs = out / "runs" / "synth-indoor"
    evaluated = yaml.safe_load((runs / "iamu-full-s0" / "config.yaml").read_text())
    assert evaluated["unlearn"]["options"]["focus"] == 1.5
    trials = sorted((out / "tune").glob("*/runs/*/tune-*/config.yaml"))  # the tuning trials
    assert trials and all(yaml.safe_load(t.read_text())["unlearn"]["options"]["focus"] == 1.5 for t in trials)
    retrain = yaml.safe_load((runs / "retrain-full-s0" / "config.yaml").read_text())
    assert retrain["unlearn"]["options"] in ({}, None)  # the references are not a variant


def test_method_set_needs_methods(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "paper_table.py"), "--quick", "--out", str(tmp_path / "b")]
        + ["--method-set", "unlearn.options.focus=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--method-set needs --methods" in proc.stderr and "Traceback" not in proc.stderr


def test_fixed_step_runs_constant_steps_on_the_tables_dev_request(bench, tmp_path):
    """bench/fixed_step.py: the tuning's fixed settings with a constant step size, its own budget and a
    trajectory, on the dev request; the row reports the run that was made."""
    out, *_ = bench
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fixed_step.py"), "--quick", "--table", str(out)]
        + ["--out", str(tmp_path / "fx"), "--setting", "full", "--run", "iamu:0.002:0.7", "--run", "grad_ascent:0.001"]
        + ["--steps", "4", "--every", "2", "--drops", "0.05"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, **ENV},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "fx/runs/synth-indoor/fixed-synth-indoor-full-iamu-lr0.002-a0.7"
    cfg = yaml.safe_load((run / "config.yaml").read_text())["unlearn"]
    assert (cfg["lr"], cfg["alpha"], cfg["lr_growth"], cfg["steps"], cfg["trajectory_every"]) == (0.002, 0.7, 1.0, 4, 2)
    assert cfg["stop_band"] == 0.0  # the tuning's fixed settings hold
    steps = [p["step"] for p in json.loads((run / "final/metrics.json").read_text())["trajectory"]["points"]]
    assert steps[0] == 0 and steps[-1] <= 4
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| iamu") or line.startswith("| grad_ascent")]
    assert [r.split(" | ")[0] for r in rows] == ["| iamu lr 0.002 alpha 0.7", "| grad_ascent lr 0.001"]


def test_fixed_step_selectivity_interpolates_the_retain_move_at_equal_forgetting():
    sys.path.insert(0, str(ROOT / "bench"))
    from fixed_step import selectivity

    def point(step, forget, retain, val):
        return {"step": step, "forget": {"seg": forget}, "retain": {"seg": retain, "depth": 1.0}, "val": {"seg": val}}

    points = [point(0, 0.8, 0.5, 0.4), point(10, 0.72, 0.45, 0.4), point(20, 0.4, 0.3, 0.3)]
    traj = {"targets": ["seg"], "points": points}
    s = selectivity(traj, [0.05, 0.2, 0.6])
    assert s["forget_drop"] == pytest.approx(0.5)
    # retain: mean over seg and depth of |U - O| / O; depth never moves
    assert s["retain"] == pytest.approx((0.2 / 0.5 + 0) / 2) and s["val"] == pytest.approx(0.25)
    # forget drop 0.05 lies between 0 and 0.1 (halfway): retain move halfway to 0.05 / 0.5 / 2
    assert s["retain@0.05"] == pytest.approx(0.5 * 0.05)
    # 0.2 lies between 0.1 and 0.5 (a quarter of the way): 0.05 + 0.25 * (0.2 - 0.05)
    assert s["retain@0.2"] == pytest.approx(0.05 + 0.25 * 0.15)
    assert s["retain@0.6"] is None and s["kept"] is None
    # a target task whose forget metric starts at 0 has no relative drop: left out, never a division by zero
    zero = {"targets": ["seg"], "points": [point(0, 0.0, 0.5, 0.4), point(10, 0.0, 0.45, 0.4)]}
    assert selectivity(zero, [0.1]) == {"forget_drop": None, "retain": pytest.approx(0.05), "val": 0.0} | {
        "kept": None,
        "retain@0.1": None,
    }


def test_knob_sweep_paired_table_differences_rows_on_shared_seeds():
    sys.path.insert(0, str(ROOT / "bench"))
    from knob_sweep import paired_table

    def row(method, variant, seed, uis):
        return {"dataset": "d", "setting": "partial", "method": method, "variant": variant, "seed": seed, "uis": uis}

    rows = [row("a", "x", s, 0.1 + 0.01 * s) for s in range(3)] + [row("b", "y", s, 0.2 + 0.02 * s) for s in range(4)]
    table = paired_table(rows, "b:y")
    # a - b on seeds 0-2 only: -0.10, -0.11, -0.12 -> mean -0.11; the reference row is not listed against itself
    (line,) = [x for x in table.splitlines() if x.startswith("| d |")]
    assert "| a:x | 3 | -0.1100 [" in line
    lo, hi = (float(v) for v in line.split("[")[1].split("]")[0].split(","))
    assert lo < -0.11 < hi < 0

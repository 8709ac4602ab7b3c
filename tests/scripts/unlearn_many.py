"""Several `mtu` commands in ONE process (plain python, or every rank of an `accelerate launch`), so a
test pays the interpreter and import start-up once instead of per run.

usage: unlearn_many.py RUNS.json STATUS.json
RUNS.json holds a list of argument lists for `mtu` (`mtu_dist.cli.main`, what the console script
calls). With one process a failing run is recorded (exit code and traceback) and the next one runs;
with several ranks the first failure ends the process, so the launcher stops the other ranks
instead of leaving them waiting in a collective.
"""

import json
import os
import sys
import traceback

from mtu_dist.cli import main

runs = json.loads(open(sys.argv[1]).read())
status, world = {}, int(os.environ.get("WORLD_SIZE", "1"))
for argv in runs:
    name = argv[argv.index("--name") + 1]
    try:
        status[name] = {"rc": main(argv)}
    except Exception:  # noqa: BLE001 - recorded for the test to report
        status[name] = {"rc": 1, "error": traceback.format_exc()}
    if status[name]["rc"] and world > 1:
        print(status[name].get("error", f"{name}: exit code {status[name]['rc']}"), file=sys.stderr)
        sys.exit(1)
if int(os.environ.get("RANK", "0")) == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(status, f)

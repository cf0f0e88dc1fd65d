"""Child process: ``kedro run --env test`` of the project, writing under another working folder.

usage: python _kedro_child.py WORKING_FOLDER PIPELINE [PIPELINE ...]

Prints the session id (= the save version of every versioned output) as its last line. The
catalog writes under the project's ``data/test``; relative paths read by nodes (the teacher's
``workdir``) resolve against WORKING_FOLDER.

With ``IBMD_CHILD_SYNC=DIR`` the child, once imported, writes ``DIR/ready-<pid>`` and waits for
``DIR/go`` before creating its session, then ``IBMD_CHILD_DELAY`` more seconds: children started
together then create their sessions a chosen few milliseconds apart, whatever their import times.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def wait_for_go() -> None:
    sync = os.environ.get("IBMD_CHILD_SYNC")
    if not sync:
        return
    (Path(sync) / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 300
    while not (Path(sync) / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {sync}/go within 300 s")
        time.sleep(0.001)
    time.sleep(float(os.environ.get("IBMD_CHILD_DELAY", "0")))


def main() -> None:
    folder, pipelines = Path(sys.argv[1]), sys.argv[2:]
    folder.mkdir(parents=True, exist_ok=True)
    bootstrap_project(PROJECT_ROOT)
    os.chdir(folder)
    wait_for_go()
    with KedroSession.create(project_path=PROJECT_ROOT, env="test") as session:
        session.run(pipeline_names=pipelines)
        print(f"SESSION {session.session_id}", flush=True)


if __name__ == "__main__":
    main()

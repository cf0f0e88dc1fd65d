"""Child process: ``kedro run --env test`` of the project, writing under another working folder.

usage: python _kedro_child.py WORKING_FOLDER PIPELINE [PIPELINE ...]

Prints the session id (= the save version of every versioned output) as its last line. The
catalog writes under the project's ``data/test``; relative paths read by nodes (the teacher's
``workdir``) resolve against WORKING_FOLDER.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    folder, pipelines = Path(sys.argv[1]), sys.argv[2:]
    folder.mkdir(parents=True, exist_ok=True)
    bootstrap_project(PROJECT_ROOT)
    os.chdir(folder)
    with KedroSession.create(project_path=PROJECT_ROOT, env="test") as session:
        session.run(pipeline_names=pipelines)
        print(f"SESSION {session.session_id}", flush=True)


if __name__ == "__main__":
    main()

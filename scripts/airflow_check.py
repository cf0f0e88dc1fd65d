"""Check the Airflow export with a real Airflow: generate the DAGs, import them, run one.

    python scripts/airflow_check.py                 # the `test` env's full DAG, end to end
    python scripts/airflow_check.py --setup-only    # only build the Airflow environment

Steps:
1. A throwaway virtual environment (``.airflow-venv/``, reused while its inputs are unchanged)
   with ``apache-airflow`` and this project at the verified pins of its direct dependencies.
   It is separate from the project's environment because Airflow and kedro-viz pin different
   web stacks (FastAPI), so they cannot share one.
2. ``kedro airflow create`` with ``airflow/dag_template.j2`` for ``__default__`` and ``distill``.
3. An import of the DAG files in Airflow's ``DagBag``: no import errors allowed.
4. ``airflow db migrate`` (SQLite in a temporary ``AIRFLOW_HOME``) and ``airflow dags test``:
   every task runs in its own Kedro session, in dependency order, from the project root.

The functions are also used by ``tests/integration/test_airflow.py`` (``make test-airflow``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

AIRFLOW_VERSION = "3.3.2"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = PROJECT_ROOT / ".airflow-venv"
DAG_TEMPLATE = PROJECT_ROOT / "airflow" / "dag_template.j2"
STAMP_NAME = ".ibmd-airflow-stamp"
# The data/weights packages are installed without their (unwanted) dependencies, so pip check
# reports those as missing; that is expected, as in the project's own environment.
ASSETS_FILE = "requirements-assets.txt"

# Python snippet run inside the Airflow environment: what Airflow itself makes of the DAG files.
_INSPECT_DAGS = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(sys.argv[1])
report = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    report["dags"][dag_id] = {
        "fileloc": dag.fileloc,
        "schedule": str(dag.schedule),
        "max_active_runs": dag.max_active_runs,
        "tasks": {
            task.task_id: {
                "queue": task.queue,
                "retries": task.retries,
                "upstream": sorted(task.upstream_task_ids),
            }
            for task in dag.tasks
        },
    }
print("DAGBAG-REPORT " + json.dumps(report))
"""


class CheckError(RuntimeError):
    """A step of the Airflow check failed; the message carries the command's last output."""


@dataclass(frozen=True)
class AirflowEnv:
    """The throwaway environment and the places one check uses."""

    venv: Path
    airflow_home: Path
    dags_folder: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def variables(self) -> dict[str, str]:
        """Process environment for Airflow and Kedro commands: no examples, no telemetry."""
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the tasks must import the project from the Airflow venv
        env.update(
            AIRFLOW_HOME=str(self.airflow_home),
            AIRFLOW__CORE__DAGS_FOLDER=str(self.dags_folder),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            KEDRO_DISABLE_TELEMETRY="true",
            PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(self.venv),
        )
        return env


def _run(
    command: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> str:
    """Run a command from the project root; return its output, or raise CheckError with its tail."""
    result = subprocess.run(
        list(command),
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        # pip's notes about the machine's unused local index folders are noise here.
        lines = [line for line in result.stdout.splitlines() if "is ignored: it is neither" not in line]
        tail = "\n".join(lines)
        raise CheckError(f"`{' '.join(command)}` exited with {result.returncode}:\n{tail[-6000:]}")
    return result.stdout


def project_pins(project_root: Path = PROJECT_ROOT) -> list[str]:
    """The project's direct dependencies (and kedro-airflow), each at its requirements.txt pin.

    Only direct dependencies are pinned: the rest is left to pip, because Airflow needs other
    versions of the web stack than the ones kedro-viz pins in requirements.txt.
    """
    pyproject = tomllib.loads((project_root / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["airflow"]]
    pinned: dict[str, str] = {}
    for line in (project_root / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pinned[canonicalize_name(name)] = version.strip()
    pins = []
    for spec in wanted:
        requirement = Requirement(spec)
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        version = pinned.get(canonicalize_name(requirement.name))
        pins.append(f"{requirement.name}{extras}=={version}" if version else spec)
    return pins


def _asset_packages(project_root: Path) -> list[str]:
    lines = (project_root / ASSETS_FILE).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def _stamp(project_root: Path) -> str:
    digest = hashlib.sha256()
    parts = [AIRFLOW_VERSION, sys.version.split()[0], *project_pins(project_root)]
    parts += _asset_packages(project_root)
    for part in parts:
        digest.update(part.encode() + b"\n")
    digest.update((project_root / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def ensure_airflow_venv(venv: Path = DEFAULT_VENV, project_root: Path = PROJECT_ROOT, log=print) -> Path:
    """Create (or reuse) a virtual environment with Airflow and this project installed.

    Reused as is while Airflow's version, the pins and ``pyproject.toml`` are unchanged.
    """
    stamp_file = venv / STAMP_NAME
    stamp = _stamp(project_root)
    up_to_date = stamp_file.is_file() and stamp_file.read_text().strip() == stamp
    if up_to_date and (venv / "bin" / "airflow").exists():
        log(f"Airflow environment {venv} is up to date")
        return venv
    started = time.monotonic()
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    pip = [python, "-m", "pip", "install", "--quiet"]
    log(f"Installing apache-airflow=={AIRFLOW_VERSION} and the project into {venv} (a few minutes)...")
    _run([*pip, "--upgrade", "pip>=24"])
    _run([*pip, f"apache-airflow=={AIRFLOW_VERSION}", *project_pins(project_root)])
    _run([*pip, "--no-deps", "-r", str(project_root / ASSETS_FILE)])
    _run([*pip, "--no-deps", "--no-build-isolation", "-e", str(project_root)])
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assets = {canonicalize_name(Requirement(spec).name) for spec in _asset_packages(project_root)}
    problems = [
        line
        for line in check.stdout.splitlines()
        if line.strip() and canonicalize_name(line.split()[0]) not in assets and "No broken" not in line
    ]
    if problems:
        raise CheckError("pip check found conflicts in the Airflow environment:\n" + "\n".join(problems))
    stamp_file.write_text(stamp + "\n")
    log(f"Airflow environment ready in {time.monotonic() - started:.0f} s")
    return venv


def create_dags(
    airflow: AirflowEnv,
    env: str,
    pipelines: Sequence[str] = ("__default__", "distill"),
    params: dict[str, str] | None = None,
    template: Path = DAG_TEMPLATE,
) -> list[Path]:
    """``kedro airflow create`` for ``pipelines`` on Kedro env ``env``; returns the DAG files."""
    command = [
        airflow.bin("kedro"), "airflow", "create",
        "--jinja-file", str(template),
        "--target-dir", str(airflow.dags_folder),
        "--env", env,
        "--pipelines", ",".join(pipelines),
    ]  # fmt: skip
    if params:
        command += ["--params", ",".join(f"{key}={value}" for key, value in params.items())]
    output = _run(command, env=airflow.variables())
    files = [airflow.dags_folder / name for name in re.findall(r"in the file `([^`]+)`", output)]
    if len(files) != len(pipelines):
        raise CheckError(f"expected {len(pipelines)} DAG files, kedro airflow create said:\n{output[-3000:]}")
    return files


def inspect_dags(airflow: AirflowEnv) -> dict:
    """Import the DAGs folder in Airflow's DagBag; return import errors, DAGs, tasks and queues."""
    command = [airflow.bin("python"), "-c", _INSPECT_DAGS, str(airflow.dags_folder)]
    output = _run(command, env=airflow.variables())
    for line in output.splitlines():
        if line.startswith("DAGBAG-REPORT "):
            return json.loads(line.removeprefix("DAGBAG-REPORT "))
    raise CheckError(f"no DagBag report in:\n{output[-3000:]}")


def _last_json_line(output: str):
    # Airflow prints warnings before its JSON on the same stream.
    for line in reversed(output.splitlines()):
        if line.startswith(("[", "{")):
            return json.loads(line)
    raise CheckError(f"no JSON in:\n{output[-3000:]}")


def migrate_db(airflow: AirflowEnv) -> None:
    """Create Airflow's SQLite metadata database in ``AIRFLOW_HOME``."""
    _run([airflow.bin("airflow"), "db", "migrate"], env=airflow.variables())


@dataclass(frozen=True)
class DagRun:
    """The outcome of ``airflow dags test``."""

    state: str
    task_states: dict[str, str]
    log: str

    @property
    def succeeded(self) -> bool:
        return self.state == "success" and all(state == "success" for state in self.task_states.values())

    def errors(self) -> list[str]:
        """The exception lines of the failed tasks' tracebacks (``module.SomeError: message``)."""
        pattern = re.compile(r"^[\w.]*(Error|Exception)\b.*:")
        return [line for line in self.log.splitlines() if pattern.match(line)]


def run_dag_test(airflow: AirflowEnv, dag_id: str, timeout: float = 1800) -> DagRun:
    """``airflow dags test dag_id``: run every task in dependency order and read back the states."""
    env = airflow.variables()
    # A failed task makes the command exit non-zero; the states below say which one.
    log = _run([airflow.bin("airflow"), "dags", "test", dag_id], env=env, timeout=timeout, check=False)
    runs = _last_json_line(_run([airflow.bin("airflow"), "dags", "list-runs", dag_id, "-o", "json"], env=env))
    if len(runs) != 1:
        raise CheckError(f"expected one run of {dag_id}, found {runs}:\n{log[-6000:]}")
    command = [airflow.bin("airflow"), "tasks", "states-for-dag-run", dag_id, runs[0]["run_id"], "-o", "json"]
    states = _last_json_line(_run(command, env=env))
    return DagRun(runs[0]["state"], {row["task_id"]: row["state"] for row in states}, log)


def dag_id_for(pipeline: str, env: str, package: str = "ibmd_pipeline") -> str:
    """The dag_id that airflow/dag_template.j2 gives a pipeline's DAG (``ibmd-pipeline-test-distill``)."""
    parts = [package] + ([] if env == "local" else [env]) + ([] if pipeline == "__default__" else [pipeline])
    return "_".join(parts).replace("_", "-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Airflow environment (reused)")
    parser.add_argument("--env", default="test", help="Kedro env of the generated DAGs (default: test)")
    parser.add_argument("--run", default="__default__", help="pipeline whose DAG `airflow dags test` runs")
    parser.add_argument("--setup-only", action="store_true", help="only create the Airflow environment")
    parser.add_argument("--keep", type=Path, help="keep the generated DAGs and AIRFLOW_HOME in this folder")
    args = parser.parse_args(argv)

    started = time.monotonic()
    venv = ensure_airflow_venv(args.venv.resolve())
    if args.setup_only:
        return 0
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="ibmd-airflow-"))
    airflow = AirflowEnv(venv=venv, airflow_home=work / "airflow_home", dags_folder=work / "dags")
    try:
        # No retries: a failing task should fail the check now, not in ten minutes.
        files = create_dags(airflow, args.env, ("__default__", "distill"), params={"retries": "0"})
        print("Generated", ", ".join(path.name for path in files))
        report = inspect_dags(airflow)
        if report["import_errors"]:
            raise CheckError(f"DAG import errors: {report['import_errors']}")
        for dag_id, dag in report["dags"].items():
            print(f"DAG {dag_id}: {len(dag['tasks'])} tasks, schedule {dag['schedule']}")
        migrate_db(airflow)
        dag_id = dag_id_for(args.run, args.env)
        print(f"airflow dags test {dag_id} ...")
        run_started = time.monotonic()
        run = run_dag_test(airflow, dag_id)
        for task_id, task_state in run.task_states.items():
            print(f"  {task_id}: {task_state}")
        print(f"DAG run {run.state} in {time.monotonic() - run_started:.0f} s")
        if not run.succeeded:
            print("\n".join(["Errors:", *run.errors()]), file=sys.stderr)
            return 1
    except CheckError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Airflow check passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

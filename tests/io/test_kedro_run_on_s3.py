"""``kedro run`` with the catalog pointed at a bucket: degrade and teacher on the S3 server.

The configuration is what the README tells a user to write: an environment whose ``globals.yml``
sets ``data_root`` to the bucket and ``storage_credentials`` to an entry of the environment's
``credentials.yml`` (key, secret, endpoint). It is made in a copy of ``conf/`` (``--conf-source``)
so the repository's configuration stays as it is; the environment starts from ``conf/test``'s
tiny sizes. The run writes the degrade bundles and grid, reads the training pairs back from the
bucket, and writes the teacher checkpoint, grid and loss plot: every output lands in the bucket
as ``<entry>/<version>/<file>`` and loads through the catalog's datasets; nothing lands on the
local disk but the teacher's working checkpoint (a local folder by design).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kedro.io.core import Version
from object_stores import S3Server, Store

from ibmd_pipeline.engine.catalog_files import is_version_name
from ibmd_pipeline.io.datasets import TensorBundleDataset, TorchCheckpointDataset
from ibmd_pipeline.io.reports import FigureReportDataset, ImageReportDataset

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = [
    "05_model_input/pairs_train.npz",
    "05_model_input/pairs_val.npz",
    "05_model_input/pairs_test.npz",
    "05_model_input/corrupted_train.npz",
    "08_reporting/degrade_grid.png",
    "06_models/teacher.pt",
    "08_reporting/teacher_grid.png",
    "08_reporting/teacher_loss.png",
]

pytestmark = pytest.mark.slow


def _bucket_environment(conf: Path, data_root: str, server: S3Server) -> None:
    shutil.copytree(PROJECT_ROOT / "conf" / "base", conf / "base")
    shutil.copytree(PROJECT_ROOT / "conf" / "test", conf / "s3")
    (conf / "s3" / "globals.yml").write_text(
        yaml.safe_dump({"data_root": data_root, "storage_credentials": "ibmd_bucket"})
    )
    (conf / "s3" / "credentials.yml").write_text(yaml.safe_dump({"ibmd_bucket": server.options()}))


def test_degrade_and_teacher_run_on_a_bucket(s3_server: S3Server, tmp_path: Path):
    bucket = s3_server.new_bucket()
    store = Store(
        kind="s3", root=f"s3://{bucket}/ibmd", options=s3_server.options(), endpoint=s3_server.endpoint
    )
    _bucket_environment(tmp_path / "conf", store.root, s3_server)
    local_before = sorted(p.name for p in PROJECT_ROOT.iterdir())
    command = [
        sys.executable, "-m", "kedro", "run", "--conf-source", str(tmp_path / "conf"), "--env", "s3",
        "--pipelines", "degrade,teacher", "--params", f"teacher.workdir={tmp_path / 'teacher_work'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KEDRO_DISABLE_TELEMETRY": "true"}
    run = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    files = store.files()
    version = files[0].split("/")[-2]
    assert is_version_name(version)
    assert files == sorted(
        f"{entry}/{version}/{Path(entry).name}" for entry in OUTPUTS
    )  # one session, no temp
    assert sorted(p.name for p in PROJECT_ROOT.iterdir()) == local_before  # no stray local "s3:" folder

    def dataset(cls, entry):
        return cls(filepath=store.url(entry), version=Version(None, None), credentials=store.options)

    pairs = dataset(TensorBundleDataset, "05_model_input/pairs_train.npz").load()
    corrupted = dataset(TensorBundleDataset, "05_model_input/corrupted_train.npz").load()
    assert pairs["clean"].shape[0] == pairs["corrupted"].shape[0] > 0 and "clean" not in corrupted
    teacher = dataset(TorchCheckpointDataset, "06_models/teacher.pt").load()
    assert teacher["catalog_version"] == version and teacher["kind"] == "teacher"
    assert dataset(ImageReportDataset, "08_reporting/teacher_grid.png").load().size[0] > 0
    assert dataset(FigureReportDataset, "08_reporting/teacher_loss.png").load().size[0] > 0

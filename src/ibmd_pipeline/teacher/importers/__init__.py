"""Import the published I2SB and DDBM teachers as this project's teacher checkpoints.

``import_teacher(parse_import_config(params), task, image_size=..., channels=...)`` returns a
teacher checkpoint (``teacher/model.py`` format); the ``import_teacher`` pipeline writes it to
the catalog's ``teacher_model``. See ``importer.py`` for what is mapped and how.
"""

from ibmd_pipeline.teacher.importers.adm import (
    PUBLISHED_ARCHITECTURES,
    AdmArchitecture,
    TeacherImportError,
    convert_adm_state_dict,
    infer_architecture,
    qkv_major_to_head_major,
)
from ibmd_pipeline.teacher.importers.config import (
    DDBMSettings,
    I2SBSettings,
    TeacherImportConfig,
    parse_import_config,
)
from ibmd_pipeline.teacher.importers.files import (
    read_ddbm_checkpoint,
    read_i2sb_checkpoint,
    read_i2sb_options,
)
from ibmd_pipeline.teacher.importers.importer import I2SB_TASKS, i2sb_bridge, i2sb_task, import_teacher

__all__ = [
    "I2SB_TASKS",
    "PUBLISHED_ARCHITECTURES",
    "AdmArchitecture",
    "DDBMSettings",
    "I2SBSettings",
    "TeacherImportConfig",
    "TeacherImportError",
    "convert_adm_state_dict",
    "i2sb_bridge",
    "i2sb_task",
    "import_teacher",
    "infer_architecture",
    "parse_import_config",
    "qkv_major_to_head_major",
    "read_ddbm_checkpoint",
    "read_i2sb_checkpoint",
    "read_i2sb_options",
]

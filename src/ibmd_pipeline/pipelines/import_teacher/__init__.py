"""The ``import_teacher`` pipeline: an official I2SB or DDBM checkpoint as the catalog's teacher."""

from ibmd_pipeline.pipelines.import_teacher.pipeline import create_pipeline

__all__ = ["create_pipeline"]

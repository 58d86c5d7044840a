"""The stages of ``nasprune compress``, one file each, all of one shape (:class:`nasprune.stages.base.Stage`).

A stage file holds the stage's YAML section (a dataclass, or a small stage config that *holds* the
algorithm's own config) and ``STAGE``: its name, what it reads and writes under the run directory,
how an interrupted run of it continues, and ``run(ctx) -> dict`` (the record kept in ``run.json``).
Adding a stage: one file here, one entry in :data:`nasprune.pipeline.STAGE_LIST` (and its section in
:class:`nasprune.config.PipelineConfig` when it has settings).
"""

"""CAPE: category-agnostic pose estimation on MP-100. The library knows nothing of the web service, the database or
Celery (import-linter checks it: pyproject.toml).

The folder says what a module is for:

- the root holds two kinds of module. The torch-free vocabulary, which the API imports: ``config``
  (TrainConfig, EvaluateConfig, the presets), ``errors``, ``epoch_record``, ``verdict``, ``run_files`` (a run
  folder's layout) and ``backbone_weights`` (which ImageNet file a backbone needs, and whether it is there). And the
  commands users type, ``python -m cape.train | cape.evaluate | cape.predict | cape.weights``: argument parsing only,
  checked before torch loads, their flags made from the configs' fields by ``cli_flags``.
- ``data/``: MP-100 on disk (catalog, torch-free), episodes, crops, transforms, batches, the synthetic generator.
- ``model/``: the CapeModel and its parts, the device it runs on, and its checkpoint file (save, load, a trained
  model from one).
- ``training/``: the trainer, its losses, the pictures of a run.
- ``evaluation/``: PCK and mPCK, the MP-100 protocol, its tables.
- ``inference/``: a prediction on a person's own images: its inputs (torch-free) and the keypoints.
"""

"""The lumbar spine MONAI Label app's code (installed in editable mode by ``make setup``).

Where things live (``docs/architecture.md`` draws the import graph):

- modules directly in ``lib/`` are the commands, run as ``python -m lib.<command>``:
  ``segment``, ``evaluate``, ``benchmark``, ``train_recipe``, ``simulate``, ``loadtest``,
  ``seed``, ``importer``, ``pacs``, ``dicom``, ``versions`` (the last two start the command of
  their home in a subpackage), and the package ``phantom``;
- ``configs/``, ``infers/``, ``trainers/``, ``scoring/``, ``activelearning/``: MONAI Label's
  task classes for the model ``spine``, as in its radiology sample app;
- ``pipeline/``: from a scan to its label map (labels, plan, I/O, transforms, networks,
  losses, metrics, post-processing, levels);
- ``server/``: what runs inside ``monailabel start_server`` besides the tasks;
- ``lifecycle/``: weights, versions, promotion, splits, auto-training;
- ``tools/``: code the commands share.
"""

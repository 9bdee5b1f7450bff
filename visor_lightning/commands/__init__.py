"""The ``visor`` sub-commands: ``cli.py`` dispatches here and nothing here imports ``cli.py``.

Library code (models, Lightning modules, data, FLOPs) lives beside this package; shared argument helpers are in
:mod:`visor_lightning.commands.args`."""

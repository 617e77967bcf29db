"""Programs over the whole pipeline: the quality harness (:mod:`.eval_quality`) and the device check
(:mod:`.device_check`), with ``tools/eval_quality.py`` and ``tools/device_check.py`` as their command lines.

They call :func:`slimexport.api.compress`, so they sit beside ``cli`` above ``api`` (cli, harness → api → the
rest): no other module of the package imports them, and ``import slimexport`` does not.
"""

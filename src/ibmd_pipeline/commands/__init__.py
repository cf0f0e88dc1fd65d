"""Command-line entry points: ``ibmd-restore`` and the torchrun/srun training command.

(Not ``cli``: Kedro reserves ``<package>.cli`` for a project's own ``kedro`` subcommands.)
"""

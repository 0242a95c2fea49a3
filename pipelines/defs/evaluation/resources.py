"""Where the evaluation tasks and their data live (a resource, so that users and tests can point it elsewhere)."""

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from gair_model.eval.tasks import default_tasks_path
from pipelines.config import REPO_ROOT

#: The bundled registry (the checkout's ``config/eval_tasks.yaml``, or the copy an installed wheel carries).
DEFAULT_TASKS_FILE = default_tasks_path()


def default_eval_data() -> Path:
    """The project's shared real data beside the checkout (the folder the tests read).

    An installed wheel has no checkout: ``../shared/data/eval`` from the current directory (as from a
    checkout's root); set ``GAIR_EVAL_DATA`` there.
    """
    checkout = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()
    return checkout.parent / "shared" / "data" / "eval"


class EvalTasks(dg.ConfigurableResource):
    """The downstream-task registry and the folder its relative paths resolve against.

    Local implementation only: the evaluation data are files (a user adds a task by adding an entry to the
    registry YAML, no code). Defaults: ``$GAIR_EVAL_TASKS`` or ``config/eval_tasks.yaml``; ``$GAIR_EVAL_DATA`` or
    ``../shared/data/eval`` beside the checkout. The code location binds the two fields to ``dg.EnvVar`` when the
    variables are set; empty fields read them when used. Tasks whose files are absent are reported as skipped.
    """

    tasks_file: str = Field(default="", description="registry YAML ('' = $GAIR_EVAL_TASKS or config/eval_tasks.yaml)")
    data_dir: str = Field(default="", description="root of the task data ('' = $GAIR_EVAL_DATA or ../shared/data/eval)")

    @property
    def tasks_path(self) -> Path:
        """The resolved registry file."""
        return Path(self.tasks_file or os.environ.get("GAIR_EVAL_TASKS") or DEFAULT_TASKS_FILE).resolve()

    @property
    def data_path(self) -> Path:
        """The resolved data folder (may not exist: every task is then skipped with the path in the reason)."""
        return Path(self.data_dir or os.environ.get("GAIR_EVAL_DATA") or default_eval_data()).resolve()

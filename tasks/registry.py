"""Every task suite a run config can name: the `task` union (discriminated on `kind`) and the
kinds in the order `turnrl tasks list` shows them. A new suite adds its config here."""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import Field

from turnrl.tasks.bfcl_multi import BfclMultiTurnConfig
from turnrl.tasks.bfcl_single import BfclSingleConfig
from turnrl.tasks.embodied import EmbodiedConfig
from turnrl.tasks.humaneval import HumanEvalConfig
from turnrl.tasks.math_python import MathPythonConfig
from turnrl.tasks.search_qa_config import SearchQAConfig
from turnrl.tasks.suite_config import SuiteConfig

TaskConfig = Annotated[
    SearchQAConfig
    | HumanEvalConfig
    | MathPythonConfig
    | BfclMultiTurnConfig
    | BfclSingleConfig
    | EmbodiedConfig,
    Field(discriminator="kind"),
]
"""The `task` of a run config."""

SUITE_CONFIGS: tuple[type[SuiteConfig], ...] = get_args(get_args(TaskConfig)[0])
"""Every suite's config class, in the union's order."""

SUITE_KINDS: tuple[str, ...] = tuple(c.kind_name() for c in SUITE_CONFIGS)
"""Every suite `task.kind` names, in the order `turnrl tasks list` shows them."""

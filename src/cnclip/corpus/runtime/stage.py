"""The stage contract: what every stage of the corpus build declares, and the run's context.

A stage is a small class in its own module under corpus/stages/. It declares
- `name`, which names its record (`work/<name>.state.json`) and its rows in the funnel;
- its inputs: `needs` (upstream stages, which must come earlier in the pipeline's list),
  `sections` (the recipe sections whose settings shape its outputs) and `extra` (anything else
  its fingerprint covers: listings of input files, a version of its algorithm);
- its `outputs` under the build layout (removed when its fingerprint changes, and by `clean`);
- `run(context) -> summary`, the summary being what its record keeps and the next run of an
  up-to-date stage returns.
Optional hooks: `prepare` (before the up-to-date check), `report` (the line printed after it),
`rejects` (the tables it adds to the rejected/ manifests), `in_funnel`.

The pipeline keeps one ordered list of stages (pipeline.STAGES); build, resume (fingerprints
chained through the list), clean, the funnel and the rejects all iterate it, so adding a stage
is its module and one entry there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Sequence

from cnclip.corpus.runtime.layout import BuildLayout
from cnclip.corpus.runtime.state import StageState, fingerprint

if TYPE_CHECKING:
    from rich.console import RenderableType

    from cnclip.corpus.recipe import Recipe
    from cnclip.corpus.runtime.engine import Engine, Table


class Stage:
    """Base of every stage; subclasses set the class attributes and override `run`."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    sections: ClassVar[tuple[str, ...]] = ()
    # Whether the funnel shows a row for this stage (a stage that never rejects a row may say no).
    in_funnel: ClassVar[bool] = True
    # A recipe section the stage runs only for (None: every build runs it).
    only_with: ClassVar[str | None] = None

    def applies(self, recipe: Recipe) -> bool:
        """Whether this build runs the stage at all (`only_with`: when the recipe has that section):
        one that does not apply is left out of the build's list, its fingerprint chain and its funnel."""
        return self.only_with is None or getattr(recipe, self.only_with) is not None

    def extra(self, recipe: Recipe) -> list:
        """What else the fingerprint covers besides the sections' settings."""
        return []

    def covers(self, recipe: Recipe) -> list:
        return [*(recipe.settings(section) for section in self.sections), *self.extra(recipe)]

    def outputs(self, layout: BuildLayout) -> tuple[Path, ...]:
        return ()

    def prepare(self, context: StageContext, state: StageState) -> None:
        """Before the up-to-date check (e.g. reopen a finished stage whose outputs were damaged)."""

    def run(self, context: StageContext) -> dict:
        raise NotImplementedError

    def report(self, summary: dict) -> str | RenderableType | None:
        """One line, or a small table (console.summary_table), for the console after the stage ran
        or was skipped (None: nothing)."""
        return None

    def rejects(self, layout: BuildLayout, engine: Engine, tables: dict[str, Table]) -> list[tuple[str, Table]]:
        """(file name, table) of the rows this stage rejected, for rejected/; `tables` holds the
        accepted rows (`accepted`), the kept samples' keys (`keys`: duplicate_of_uid, duplicate_of)
        and the download attempts (`attempts`, None before any download)."""
        return []

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


@dataclass
class StageContext:
    """What a stage's run receives: the recipe, its layout, the build's one engine, and the states
    of every stage of this build (computed once, from the list the build iterates)."""

    recipe: Recipe
    layout: BuildLayout
    engine: Engine
    stages: Sequence[Stage]
    states: dict[str, StageState] = field(default_factory=dict)

    @property
    def funnel_stages(self) -> list[str]:
        return [stage.name for stage in self.stages if stage.in_funnel]


def check_order(stages: Sequence[Stage]) -> None:
    """Each stage's `needs` come before it, and names are unique: a list that breaks either is a bug."""
    seen: set[str] = set()
    for stage in stages:
        missing = [need for need in stage.needs if need not in seen]
        if missing or stage.name in seen:
            raise ValueError(f"stage {stage.name!r}: listed before {missing} or twice")
        seen.add(stage.name)


def applicable(recipe: Recipe, stages: Sequence[Stage]) -> list[Stage]:
    """The stages this recipe's build runs, in list order."""
    return [stage for stage in stages if stage.applies(recipe)]


def stage_states(recipe: Recipe, stages: Sequence[Stage]) -> dict[str, StageState]:
    """Each stage's record, fingerprinted by what it covers and the fingerprint of the stage
    before it in the list (the first stage's own name seeds the chain); stages that do not apply
    to the recipe are left out (the chain is then the one the list without them gives)."""
    stages = applicable(recipe, stages)
    check_order(stages)
    layout = BuildLayout.of(recipe)
    states: dict[str, StageState] = {}
    previous: str | None = None
    for stage in stages:
        digest = fingerprint(previous if previous is not None else stage.name, *stage.covers(recipe))
        states[stage.name] = StageState(layout.work, stage.name, digest, tuple(stage.outputs(layout)))
        previous = digest
    return states

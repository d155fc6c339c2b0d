"""Config of the Search QA suite (`turnrl.tasks.search_qa`), apart from it because the suite
imports the BM25 index (bm25s, numpy), which loading a run config must not."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from turnrl.tasks.suite_config import BuildContext, SuiteConfig

if TYPE_CHECKING:
    from turnrl.tasks.search_qa import SearchQA


class SearchQAConfig(SuiteConfig):
    """Factbook questions answered with BM25 search over Wikipedia and the Factbook."""

    metrics: ClassVar[tuple[str, ...]] = ("correct", "exact_match", "f1")
    answer_in_observations: ClassVar[bool] = True

    kind: Literal["search_qa"] = "search_qa"
    seed: int = 0
    """Seed of question generation (and so of the split)."""
    n_train: int = Field(400, ge=1)
    """Train items generated."""
    n_test: int = Field(100, ge=1)
    """Test items generated (disjoint from train)."""
    search_k: int = Field(3, ge=1, le=10)
    """Default number of passages a search returns."""
    result_tokens: int = Field(256, ge=16)
    """Token budget of one search result."""

    def build(self, ctx: BuildContext) -> SearchQA:
        from turnrl.tasks.search_qa import SearchQA

        return SearchQA(
            seed=self.seed,
            n_train=self.n_train,
            n_test=self.n_test,
            encode=ctx.encode,
            search_k=self.search_k,
            result_tokens=self.result_tokens,
        )

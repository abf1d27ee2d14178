"""A token and cost budget: the run stops sending requests once it is spent."""

from __future__ import annotations

from dataclasses import dataclass, field


class BudgetExhausted(Exception):
    """Raised by :meth:`Budget.check` once a limit is reached; carries the reason."""


@dataclass
class Budget:
    """Limits on what new (uncached) requests may cost. Prices are per million tokens.
    ``None`` means no limit. Cached answers cost nothing and are not counted."""

    max_tokens: int | None = None
    max_cost: float | None = None
    price_input_per_m: float = 0.0
    price_output_per_m: float = 0.0
    prompt_tokens: int = field(default=0, init=False)
    completion_tokens: int = field(default=0, init=False)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> float:
        return (
            self.prompt_tokens * self.price_input_per_m
            + self.completion_tokens * self.price_output_per_m
        ) / 1e6

    def add(self, usage: dict | None) -> None:
        usage = usage or {}
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def exhausted(self) -> str | None:
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return f"token budget reached ({self.tokens} ≥ budget.max_tokens={self.max_tokens})"
        if self.max_cost is not None and self.cost >= self.max_cost:
            return f"cost budget reached (${self.cost:.4f} ≥ budget.max_cost={self.max_cost})"
        return None

    def check(self) -> None:
        why = self.exhausted()
        if why:
            raise BudgetExhausted(why)

    def summary(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": round(self.cost, 6),
        }

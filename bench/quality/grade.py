"""Is an extracted answer the expected one? The comparison each problem names."""

from __future__ import annotations

from bench.quality.problems import NUMBER, WORD, YES_NO, Problem


def is_correct(problem: Problem, extracted: str | None) -> bool:
    if extracted is None:
        return False
    if problem.compare == NUMBER:
        try:
            return abs(float(extracted) - float(problem.answer)) <= problem.tolerance + 1e-9
        except ValueError:
            return False
    if problem.compare in (WORD, YES_NO):
        return extracted.strip().casefold() == problem.answer.casefold()
    raise ValueError(f"unknown comparison {problem.compare!r}")

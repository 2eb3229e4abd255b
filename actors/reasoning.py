"""How a thread's step reads in the client's `reasoning_content`: labelled by thread and step."""

from __future__ import annotations

from actors.schemas import StepEvent, VerdictStatus


def reasoning_text(event: StepEvent) -> str:
    step = event.step
    verdict = step.verdict
    if event.rejected:
        status = "failed validation, revising"
    elif verdict is None:
        status = "not validated"
    elif step.flagged:
        status = "challenged (kept)"
    elif verdict.status is VerdictStatus.UNVALIDATED:
        status = "unvalidated"
    else:
        status = "revised, passed" if step.revised else "passed"
    label = f"[thread {event.thread_index + 1} · step {step.index + 1} · {status}]"
    text = f"{label} {step.text}\n"
    if event.rejected and verdict is not None and verdict.counterexamples:
        text += "".join(f"  counterexample: {c.strip()}\n" for c in verdict.counterexamples)
    return text + "\n"

"""Deployment variants that fail unexpectedly, for tests of what a client then sees.

Importable by the replicas (the test session puts the repo on their PYTHONPATH); each app is the
real service with one deployment swapped for a variant whose work raises a plain RuntimeError.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from actors.config import load_config
from actors.prompts import load_prompts
from deployments.app import bind_service
from deployments.fuser import Fuser
from deployments.ingress import Ingress
from deployments.thinker import Thinker
from deployments.validator import Validator


class Broken(RuntimeError):
    pass


# Named as the deployments they stand in for, so serve_config.yaml's options apply to them.
@serve.deployment(name="Thinker")
class BrokenThinker(Thinker.func_or_class):
    async def think(self, job):
        raise Broken("a bug in the thinker")
        yield  # unreachable: makes this an async generator like the real one

    async def think_whole(self, job):
        raise Broken("a bug in the thinker")


@serve.deployment(name="Validator")
class BrokenValidator(Validator.func_or_class):
    async def validate(self, jobs):
        raise Broken("a bug in the validator")


@serve.deployment(name="Fuser")
class BrokenFuser(Fuser.func_or_class):
    async def fuse(self, job):
        raise Broken("a bug in the fuser")
        yield  # unreachable: makes this an async generator like the real one

    async def answer(self, job):
        raise Broken("a bug in the fuser")


class _BrokenIngress(Ingress.func_or_class):
    def _admit(self):
        raise Broken("a bug in the ingress")


BrokenIngress = Ingress.options(func_or_class=_BrokenIngress)

VARIANTS = {
    "ingress": {"ingress": BrokenIngress},
    "thinker": {"thinker": BrokenThinker},
    "validator": {"validator": BrokenValidator},
    "fuser": {"fuser": BrokenFuser},
}


def build(args: dict[str, Any]):
    config = load_config(args["config"])
    return bind_service(config, load_prompts(config.prompts), **VARIANTS[args["broken"]])

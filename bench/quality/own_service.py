"""Without --base-url: `serve run` of the shipped serve_config.yaml on a free port, the app
config given by --config pointed at that port (as bench/service.py and tests/test_embedded.py do)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from bench.service import WORK, Proc, free_port, serve_config, start_serve, write_yaml

# Roles of the shipped configs reach the embedded model through the service's own port 8000.
_LOCAL_8000 = re.compile(r"(127\.0\.0\.1|localhost):8000\b")


def start_own_service(app_config_path: Path) -> tuple[Proc, str, Path]:
    """The running service, its root URL and the app config it runs (the given one, re-pointed)."""
    port = free_port()
    text = app_config_path.read_text()
    # The `local` app (the embedded model) is needed only when some role calls it.
    embedded = any("/local/" in url for url in _base_urls(yaml.safe_load(text)))
    app_yaml = WORK / "quality" / f"app-{port}.yaml"
    app_yaml.parent.mkdir(parents=True, exist_ok=True)
    app_yaml.write_text(_LOCAL_8000.sub(lambda m: f"{m[1]}:{port}", text))
    serve_yaml = write_yaml(WORK / "quality" / f"serve-{port}.yaml", serve_config(port, embedded=embedded))
    proc = start_serve(serve_yaml, app_yaml, port, check_local=embedded)
    return proc, f"http://127.0.0.1:{port}", app_yaml


def _base_urls(node: Any) -> list[str]:
    """Every `base_url` of a config, at any depth (roles, fallbacks, profiles)."""
    if isinstance(node, dict):
        own = [node["base_url"]] if isinstance(node.get("base_url"), str) else []
        return own + [url for value in node.values() for url in _base_urls(value)]
    if isinstance(node, list):
        return [url for value in node for url in _base_urls(value)]
    return []

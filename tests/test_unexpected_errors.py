"""An unexpected exception in any deployment never reaches a client as a bare 500."""

import openai
import pytest

from tests.conftest import deploy
from tests.support import shipped_serve_config

pytestmark = pytest.mark.serve

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


@pytest.fixture(scope="module")
def broken_app(service_apps, serve_http):
    """Deploys one broken variant at a time beside the real app, at /broken; removed at the end."""
    port = int(serve_http.rsplit(":", 1)[1])
    real = service_apps[0]

    def with_broken(part: str) -> openai.OpenAI:
        app = shipped_serve_config(port)["applications"][0]
        app.update(
            name="broken",
            route_prefix="/broken",
            import_path="tests.faulty:build",
            args={"config": real["args"]["config"], "broken": part},
            runtime_env=real["runtime_env"],
        )
        deploy([real, app])
        return openai.OpenAI(base_url=f"{serve_http}/broken/v1", api_key="tk-test-client-key", max_retries=0)

    yield with_broken
    deploy([real])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_unexpected_errors_are_shaped_or_degraded_in_every_deployment(broken_app, sim, stream):
    def ask(client):
        reply = client.chat.completions.create(model="token-killer", messages=QUESTION, stream=stream)
        if not stream:
            return reply.choices[0].message.content, reply.model_extra["token_killer"]
        chunks = list(reply)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None

    for part in ("ingress", "thinker"):  # nothing to answer with: an OpenAI-shaped 500
        with pytest.raises(openai.InternalServerError) as caught:
            ask(broken_app(part))
        error = caught.value
        assert set(error.body) == {"message", "type", "param", "code"}
        assert error.body["code"] == "internal_error" and "request id" in error.body["message"]
        assert "a bug in the" not in error.response.text  # no internal detail
        assert error.response.headers["x-should-retry"] == "false"

    answer, extension = ask(broken_app("validator"))  # steps stay unvalidated, the answer comes
    assert answer == "The fused final answer is 42."
    if extension:
        assert extension["steps_validated"] == 0

    answer, extension = ask(broken_app("fuser"))  # the best thread answers
    assert answer == "We reason about the problem carefully."
    if extension:
        assert extension["fusion"]["mode"] == "best_thread"

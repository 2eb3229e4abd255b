"""Configuration is validated once, at start-up, with the offending field named."""

import pytest

from actors.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ContextConfig,
    ThinkingConfig,
    ValidationConfig,
    load_config,
    resolve_config_path,
)
from actors.prompts import load_prompts
from tests.support import sim_config_dict, write_config

URL = "http://127.0.0.1:9/v1"


def test_the_shipped_configs_are_valid_and_the_built_in_defaults_are_the_documented_ones():
    config = load_config(DEFAULT_CONFIG_PATH)
    assert config.context.strategy == "smart" and config.fusion.strategy == "intelligent"
    assert ThinkingConfig().num_threads == 3
    assert ValidationConfig().model_dump() == {
        "enabled": True,
        "num_counterexamples": 3,
        "num_voters": 3,
        "pass_threshold": 2,
        "on_fail": "revise",
    }
    assert ContextConfig().preserve_recent_steps == 2
    assert load_prompts("en").thinker_system and "【完成】" in load_prompts("zh").thinker_system


def test_a_typo_stops_start_up_naming_the_field(tmp_path):
    config = sim_config_dict(URL)
    config["thinking"] = {"num_thread": 3}
    with pytest.raises(ConfigError, match=r"thinking\.num_thread"):
        load_config(write_config(tmp_path / "c.yaml", config))


def test_a_wrong_type_names_the_field(tmp_path):
    config = sim_config_dict(URL)
    config["models"]["voter"]["temperature"] = "hot"
    with pytest.raises(ConfigError, match=r"models\.voter\.temperature"):
        load_config(write_config(tmp_path / "c.yaml", config))


def test_an_unreachable_threshold_is_refused(tmp_path):
    config = sim_config_dict(URL, validation={"num_voters": 2, "pass_threshold": 3})
    with pytest.raises(ConfigError, match="pass_threshold"):
        load_config(write_config(tmp_path / "c.yaml", config))


def test_every_role_needs_a_model(tmp_path):
    config = sim_config_dict(URL)
    del config["models"]["fuser"]
    with pytest.raises(ConfigError, match="fuser"):
        load_config(write_config(tmp_path / "c.yaml", config))


def test_a_missing_api_key_stops_start_up_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.delenv("TK_TEST_KEY", raising=False)
    config = sim_config_dict(URL)
    config["models"]["thinker"]["api_key_env"] = "TK_TEST_KEY"
    with pytest.raises(ConfigError, match=r"models\.thinker\.api_key_env.*TK_TEST_KEY"):
        load_config(write_config(tmp_path / "c.yaml", config), env_file=tmp_path / "none.env")


def test_api_keys_come_from_dotenv_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("TK_TEST_KEY", raising=False)
    config = sim_config_dict(URL)
    config["models"]["thinker"]["api_key_env"] = "TK_TEST_KEY"
    path = write_config(tmp_path / "c.yaml", config)
    env_file = tmp_path / ".env"
    env_file.write_text("TK_TEST_KEY=from-dotenv\n")

    loaded = load_config(path, env_file=env_file)
    assert loaded.models["thinker"].api_key.get_secret_value() == "from-dotenv"
    assert "from-dotenv" not in repr(loaded)

    monkeypatch.setenv("TK_TEST_KEY", "from-env")
    assert load_config(path, env_file=env_file).models["thinker"].api_key.get_secret_value() == "from-env"


def test_the_config_path_env_var_wins_over_app_args(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKEN_KILLER_CONFIG", raising=False)
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH
    assert resolve_config_path(str(tmp_path / "a.yaml")) == tmp_path / "a.yaml"
    monkeypatch.setenv("TOKEN_KILLER_CONFIG", str(tmp_path / "b.yaml"))
    assert resolve_config_path(str(tmp_path / "a.yaml")) == tmp_path / "b.yaml"


def test_an_unknown_prompt_set_is_refused():
    with pytest.raises(ConfigError, match="prompt"):
        load_prompts("klingon")

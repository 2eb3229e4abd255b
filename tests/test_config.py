"""Configuration is validated once, at start-up, with the offending field named; profiles and a
request's `token_killer` overrides resolve into the settings a request runs with."""

import pytest

from actors.config import (
    DEFAULT_CONFIG_PATH,
    PROJECT_ROOT,
    ConfigError,
    ContextConfig,
    EconomyConfig,
    LimitsConfig,
    ModelPrice,
    RunSettings,
    ServiceConfig,
    SettingsError,
    ThinkingConfig,
    ValidationConfig,
    load_config,
    request_settings,
    resolve_config_path,
)
from actors.prompts import load_prompts
from tests.support import sim_config, sim_config_dict, write_config

URL = "http://127.0.0.1:9/v1"
ALL_OFF = {
    "n_sampling": False,
    "staged_voting": False,
    "skip_vote_without_counterexample": False,
    "agreement_shortcut": "off",
    "incremental_summary": False,
    "cache_friendly_prompts": False,
}


def test_the_shipped_config_is_valid_and_the_built_in_defaults_are_the_documented_ones():
    config = load_config(DEFAULT_CONFIG_PATH)
    assert config.context.strategy == "smart" and config.fusion.strategy == "intelligent"
    assert list(config.profiles) == ["token-killer", "token-killer-classic", "token-killer-deep"]
    assert config.default_profile == "token-killer"
    assert config.profile_settings["token-killer-classic"].economy.model_dump() == ALL_OFF
    assert config.profile_settings["token-killer-deep"].thinking.max_steps == 6
    assert ThinkingConfig().model_dump() == {"num_threads": 3, "max_steps": 3, "live_tokens": False}
    assert ValidationConfig().model_dump() == {
        "enabled": True,
        "num_counterexamples": 3,
        "num_voters": 3,
        "pass_threshold": 2,
        "on_fail": "revise",
    }
    assert ContextConfig().model_dump() == {"strategy": "smart", "preserve_recent_steps": 2}
    assert EconomyConfig().model_dump() == {
        "n_sampling": True,
        "staged_voting": True,
        "skip_vote_without_counterexample": True,
        "agreement_shortcut": "brief",
        "incremental_summary": True,
        "cache_friendly_prompts": True,
    }
    limits = LimitsConfig()
    assert (limits.max_threads, limits.max_steps, limits.budget_tokens, limits.max_budget_tokens) == (
        8,
        12,
        None,
        2_000_000,
    )
    assert load_prompts("en").thinker_system and "【完成】" in load_prompts("zh").thinker_system


def test_the_example_provider_config_is_valid(monkeypatch):
    for name in ("OPENAI_API_KEY", "DEEPSEEK_API_KEY"):
        monkeypatch.setenv(name, "sk-example")
    config = load_config(PROJECT_ROOT / "configs" / "examples" / "openai.yaml")
    assert config.models["thinker"].api_key.get_secret_value() == "sk-example"


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


def test_a_negative_price_is_refused(tmp_path):
    config = sim_config_dict(URL)
    config["models"]["fuser"]["price"] = {"input": -1, "output": 2}
    with pytest.raises(ConfigError, match=r"models\.fuser\.price\.input"):
        load_config(write_config(tmp_path / "c.yaml", config))


def test_a_price_without_a_cached_rate_bills_cached_tokens_as_input():
    price = ModelPrice(input=1.5, output=6)
    assert price.cached_input is None


@pytest.mark.parametrize("key", ["service_api_keys", "profile_settings"])
def test_computed_fields_cannot_come_from_the_file(tmp_path, key):
    config = sim_config_dict(URL)
    config[key] = {}
    with pytest.raises(ConfigError, match=key):
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


def test_service_keys_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKEN_KILLER_API_KEYS", " key-a , key-b,,")
    loaded = load_config(write_config(tmp_path / "c.yaml", sim_config_dict(URL)), env_file=tmp_path / "none.env")
    assert [k.get_secret_value() for k in loaded.service_api_keys] == ["key-a", "key-b"]


def test_the_config_path_env_var_wins_over_app_args(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKEN_KILLER_CONFIG", raising=False)
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH
    assert resolve_config_path(str(tmp_path / "a.yaml")) == tmp_path / "a.yaml"
    monkeypatch.setenv("TOKEN_KILLER_CONFIG", str(tmp_path / "b.yaml"))
    assert resolve_config_path(str(tmp_path / "a.yaml")) == tmp_path / "b.yaml"


def test_an_unknown_prompt_set_is_refused():
    with pytest.raises(ConfigError, match="prompt"):
        load_prompts("klingon")


# --- profiles ------------------------------------------------------------------------------


def test_a_profile_overrides_the_base_settings_section_by_section():
    config = sim_config(URL, profiles={"p": {"thinking": {"max_steps": 5}, "fusion": {"strategy": "concat"}}})
    settings = config.profile_settings["p"]
    assert (settings.thinking.num_threads, settings.thinking.max_steps) == (3, 5)  # num_threads from the base
    assert settings.fusion.strategy == "concat"
    assert settings.validation == config.validation


def test_economy_off_in_yaml_switches_every_mechanism_off(tmp_path):
    path = tmp_path / "c.yaml"
    text = write_config(path, sim_config_dict(URL, profiles={"a": {}})).read_text()
    path.write_text(text + "economy: off\n")  # YAML reads a bare `off` as false
    config = load_config(path, env_file=tmp_path / "none.env")
    assert config.economy.model_dump() == ALL_OFF
    assert config.profile_settings["a"].economy.model_dump() == ALL_OFF


def test_a_profile_can_switch_economy_off_or_back_on_one_at_a_time():
    config = sim_config(
        URL,
        economy=False,
        profiles={
            "off": {},
            "some": {"economy": {"n_sampling": True, "agreement_shortcut": "no_call"}},
            "none": {"economy": False},
        },
    )
    assert config.profile_settings["off"].economy.model_dump() == ALL_OFF
    assert config.profile_settings["none"].economy.model_dump() == ALL_OFF
    assert config.profile_settings["some"].economy.model_dump() == ALL_OFF | {
        "n_sampling": True,
        "agreement_shortcut": "no_call",
    }


def test_agreement_shortcut_off_as_yaml_false():
    assert EconomyConfig.model_validate({"agreement_shortcut": False}).agreement_shortcut == "off"


def test_a_typo_in_a_profile_names_the_profile_and_field(tmp_path):
    config = sim_config_dict(URL, profiles={"fast": {"thinking": {"num_thread": 1}}})
    with pytest.raises(ConfigError, match=r"profiles\.fast\.thinking\.num_thread"):
        load_config(write_config(tmp_path / "c.yaml", config))


@pytest.mark.parametrize("profiles", [{}, {"p": 3}])
def test_profiles_must_be_a_non_empty_mapping_of_mappings(profiles):
    with pytest.raises(ValueError, match="profiles"):
        sim_config(URL, profiles=profiles)


# --- a request's overrides -----------------------------------------------------------------

PROFILE = RunSettings()
LIMITS = LimitsConfig()


def test_no_overrides_is_the_profile_itself():
    assert request_settings(PROFILE, None, LIMITS) is PROFILE


def test_overrides_apply_on_top_of_the_profile():
    settings = request_settings(
        PROFILE,
        {"thinking": {"num_threads": 2}, "economy": {"staged_voting": False}, "budget_tokens": 5000},
        LIMITS,
    )
    assert (settings.thinking.num_threads, settings.thinking.max_steps) == (2, PROFILE.thinking.max_steps)
    assert settings.economy.staged_voting is False and settings.economy.n_sampling is True
    assert settings.budget_tokens == 5000


def test_economy_false_in_a_request_switches_every_mechanism_off():
    assert request_settings(PROFILE, {"economy": False}, LIMITS).economy.model_dump() == ALL_OFF


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"thinking": {"num_thread": 2}}, "token_killer.thinking.num_thread"),
        ({"colour": "blue"}, "token_killer.colour"),
        ({"thinking": {"num_threads": "3"}}, "token_killer.thinking.num_threads"),  # JSON types are strict
        ({"thinking": {"num_threads": True}}, "token_killer.thinking.num_threads"),
        ({"thinking": {"num_threads": 0}}, "token_killer.thinking.num_threads"),
        ({"validation": {"on_fail": "shrug"}}, "token_killer.validation.on_fail"),
        ({"budget_tokens": 0}, "token_killer.budget_tokens"),
        ({"thinking": {"num_threads": 9}}, "token_killer.thinking.num_threads"),  # over max_threads 8
        ({"thinking": {"max_steps": 13}}, "token_killer.thinking.max_steps"),  # over max_steps 12
        ({"budget_tokens": 2_000_001}, "token_killer.budget_tokens"),  # over max_budget_tokens
    ],
)
def test_a_bad_override_is_refused_naming_the_field(overrides, param):
    with pytest.raises(SettingsError) as caught:
        request_settings(PROFILE, overrides, LIMITS)
    assert caught.value.param == param
    assert param in str(caught.value)


def test_a_ceiling_refusal_says_the_ceiling():
    with pytest.raises(SettingsError, match="at most 8"):
        request_settings(PROFILE, {"thinking": {"num_threads": 9}}, LIMITS)


def test_values_at_the_ceilings_are_accepted():
    settings = request_settings(
        PROFILE, {"thinking": {"num_threads": 8, "max_steps": 12}, "budget_tokens": 2_000_000}, LIMITS
    )
    assert (settings.thinking.num_threads, settings.thinking.max_steps, settings.budget_tokens) == (8, 12, 2_000_000)


def test_the_default_budget_applies_when_the_request_sets_none():
    limits = LimitsConfig(budget_tokens=40_000)
    assert request_settings(PROFILE, None, limits).budget_tokens == 40_000
    assert request_settings(PROFILE, {"thinking": {"num_threads": 1}}, limits).budget_tokens == 40_000
    assert request_settings(PROFILE, {"budget_tokens": 900}, limits).budget_tokens == 900


def test_the_ceilings_bound_what_a_request_sets_not_what_its_profile_has():
    # The operator may give a profile more threads than a request may ask for.
    profile = sim_config(URL, profiles={"wide": {"thinking": {"num_threads": 10}}}).profile_settings["wide"]
    settings = request_settings(profile, {"fusion": {"strategy": "concat"}}, LIMITS)
    assert (settings.thinking.num_threads, settings.fusion.strategy) == (10, "concat")


def test_service_config_round_trip_keeps_profiles():
    config = sim_config(URL)
    again = ServiceConfig.model_validate(config.model_dump())
    assert again.profile_settings == config.profile_settings

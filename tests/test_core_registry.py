"""The shared Registry: refuses duplicates, names the valid choices on a miss, and stays a plain dict."""

import pytest

from clip_stage.core.registry import Registry


def _colours() -> Registry[int]:
    reg: Registry[int] = Registry("colour")
    for name, value in (("red", 1), ("green", 2), ("blue", 3)):
        reg.register(name, value)
    return reg


def test_register_returns_value_and_lookup_finds_it():
    reg: Registry[object] = Registry("thing")
    value = object()
    assert reg.register("x", value) is value
    assert reg.lookup("x") is value


def test_duplicate_refused_and_first_value_kept():
    reg = _colours()
    with pytest.raises(ValueError, match=r"^colour 'red' is already registered$"):
        reg.register("red", 9)
    assert reg["red"] == 1


def test_unknown_name_lists_valid_names_sorted():
    with pytest.raises(KeyError) as e:
        _colours().lookup("pink")
    assert e.value.args[0] == "unknown colour 'pink'; valid: ['blue', 'green', 'red']"
    # a project ValueError too: a command passing a user's option through reports one line, not a traceback
    from clip_stage.core.errors import is_user_error, one_line

    assert is_user_error(e.value) and one_line(e.value) == e.value.args[0]


def test_custom_error_type():
    class SpecError(ValueError):
        pass

    reg: Registry[int] = Registry("kind", error=SpecError)
    with pytest.raises(SpecError, match=r"unknown kind 'x'; valid: \[\]"):
        reg.lookup("x")


def test_dict_behaviour_preserved():
    reg = _colours()
    assert isinstance(reg, dict)
    assert list(reg) == ["red", "green", "blue"]  # registration order
    assert sorted(reg) == ["blue", "green", "red"]
    assert "red" in reg and "pink" not in reg
    assert reg["green"] == 2 and len(reg) == 3
    assert dict(reg.items()) == {"red": 1, "green": 2, "blue": 3}
    assert list(reg.values()) == [1, 2, 3]
    assert reg.get("pink") is None  # dict.get keeps its meaning; `lookup` is the checked access
    with pytest.raises(KeyError):
        reg["pink"]

import pytest

from models import HybridConfig


@pytest.mark.parametrize("field,value", [
    ("mode", "attention"), ("combine", "add"), ("window", 0), ("window", 2.5), ("sink_tokens", -1),
    ("chunk_size", 48), ("chunk_size", 0), ("backend", "cuda"), ("full_attention_layers", [1, 1]),
    ("gate_soft_cap", -1.0),
])
def test_bad_values_name_field_and_allowed_values(field, value):
    with pytest.raises(ValueError, match=field) as err:
        HybridConfig(**{field: value})
    assert "allowed values" in str(err.value)


def test_round_trip_and_unknown_field():
    cfg = HybridConfig(mode="mlstm", window=16, full_attention_layers=[3, 1])
    assert cfg.full_attention_layers == [1, 3]
    assert HybridConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="windw"):
        HybridConfig.from_dict({**cfg.to_dict(), "windw": 3})

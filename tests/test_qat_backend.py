"""Both quantization backends implement one interface, `qat.backend.QuantBackend`."""
import inspect

import pytest

from qat import backend, fx, pt2e

MEMBERS = [name for name, value in vars(backend.QuantBackend).items()
           if inspect.isfunction(value) and not name.startswith("_")]


def test_the_protocol_names_every_call_the_engine_and_schedule_make():
    assert set(MEMBERS) >= {"prepare_qat", "prepare_ptq", "convert", "fake_quant_modules", "observers_disabled",
                            "freeze_bn_stats", "bn_frozen"}


@pytest.mark.parametrize("module", [fx, pt2e], ids=["fx", "pt2e"])
@pytest.mark.parametrize("name", MEMBERS)
def test_backend_module_implements_the_protocol(module, name):
    expected = [p for p in inspect.signature(getattr(backend.QuantBackend, name)).parameters if p != "self"]
    implemented = inspect.signature(getattr(module, name)).parameters
    required = [p for p, param in implemented.items() if param.default is inspect.Parameter.empty]
    assert list(implemented)[: len(expected)] == expected  # same leading parameters, by name
    assert len(required) <= len(expected)  # anything extra has a default


def test_a_module_missing_a_call_fails_the_check():
    """Negative control: the check above can fail."""
    class Partial:
        prepare_qat = staticmethod(fx.prepare_qat)

    assert not all(hasattr(Partial, name) for name in MEMBERS)

"""Quantization: the qconfig spec, the backends (prepare / convert / toggles), the QAT schedule, PTQ calibration,
and deployment (convert → export → reload → verify, `qat/deploy.py`).

`prepare_qat`, `prepare_ptq`, `convert`, the schedule's toggles and the reports come from
`qat/backend.py`, which forwards each call to `qat/fx.py` (FX/fbgemm, the default) or
`qat/pt2e.py` (torchao PT2E) by `spec.backend` or by the prepared model, so callers never name a
backend; so do the artifact's `export_int8` / `load_int8` / `inference_runner` and its sidecar
helpers. Tools import `qat` only; the search's own API is `qat.search`, `qat.mixed` and
`qat.sensitivity`. `build_qconfig_mapping` is FX's alone (a `QConfigMapping` has no PT2E meaning).
"""
from . import backend
from .backend import (
    ARTIFACT_SUFFIXES,
    bn_frozen,
    export_int8,
    inference_runner,
    load_int8,
    convert,
    fake_quant_modules,
    fake_quant_owners,
    float_op_names,
    freeze_bn_stats,
    observers_disabled,
    prepare_ptq,
    prepare_qat,
    quantized_op_count,
    set_fake_quant,
    set_observer,
    unfreeze_bn_stats,
    weighted_layer_names,
)
from .deploy import Deployed, deploy, load_deployed
from .export import artifact_mode, file_size_mb, packed_size_mb, read_checked_sidecar, read_sidecar, sidecar_path
from .fx import build_qconfig_mapping, int8_engine, preferred_int8_engine, torch_ao_reference
from .ptq import calibrate
from .schedule import QuantSchedule, group_stages, stage_key
from .spec import (
    FX_BACKENDS,
    PT2E_BACKENDS,
    LayerChoice,
    QConfigSpec,
    SpecError,
    load_spec,
    save_spec,
    spec_from_config,
)

__all__ = [
    "backend",
    "QConfigSpec",
    "LayerChoice",
    "SpecError",
    "load_spec",
    "save_spec",
    "spec_from_config",
    "build_qconfig_mapping",
    "prepare_qat",
    "prepare_ptq",
    "convert",
    "fake_quant_modules",
    "fake_quant_owners",
    "set_fake_quant",
    "set_observer",
    "observers_disabled",
    "freeze_bn_stats",
    "unfreeze_bn_stats",
    "bn_frozen",
    "weighted_layer_names",
    "quantized_op_count",
    "float_op_names",
    "QuantSchedule",
    "stage_key",
    "group_stages",
    "calibrate",
    "Deployed",
    "deploy",
    "artifact_mode",
    "ARTIFACT_SUFFIXES",
    "export_int8",
    "load_int8",
    "int8_engine",
    "preferred_int8_engine",
    "torch_ao_reference",
    "inference_runner",
    "read_sidecar",
    "read_checked_sidecar",
    "sidecar_path",
    "file_size_mb",
    "packed_size_mb",
    "FX_BACKENDS",
    "PT2E_BACKENDS",
    "load_deployed",
]

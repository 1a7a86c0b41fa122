"""The compiled pipeline as the cluster commands use it: the cluster settings (`--config`,
`--image`), the spec's text and its hash, and its declared parameters, against which
``--param`` / ``--params-file`` values are typed and then checked (``thaw.params``)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from thaw.errors import ThawError
from thaw.params import check_pipeline_parameters

if TYPE_CHECKING:  # imported lazily at run time: pipelines pulls in kfp
    from pipelines.settings import ClusterSettings

PACKAGE_NAME = "thaw_pipeline.yaml"
# KFP's parameterType names (pipeline_spec.proto, ParameterType)
_TYPE_NAMES = {"STRING": "a string", "NUMBER_INTEGER": "an integer",
               "NUMBER_DOUBLE": "a number", "BOOLEAN": "true or false"}


def cluster_settings(config: Path | None, image: str | None = None) -> ClusterSettings:
    """``load_settings(config)`` with ``image`` (``--image`` / ``THAW_IMAGE``) on top; a bad
    file is a ThawError naming the field."""
    from pipelines.settings import SettingsError, load_settings

    try:
        settings = load_settings(config)
    except SettingsError as err:
        raise ThawError(str(err)) from err
    if image:
        settings = dataclasses.replace(settings, image=image)
    return settings


@dataclass(frozen=True)
class CompiledPipeline:
    text: str
    parameter_types: dict[str, str]  # name -> KFP parameterType
    name: str
    defaults: dict[str, Any] = field(default_factory=dict)  # name -> typed default value

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def version_name(self) -> str:
        """The pipeline version's name: the same spec always gets the same name."""
        return f"spec-{self.sha256[:16]}"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / PACKAGE_NAME
        path.write_text(self.text)
        return path


def compile_spec(settings: ClusterSettings) -> CompiledPipeline:
    """Compile the pipeline for ``settings`` (``compile_pipeline``, as `thaw compile` does)."""
    from pipelines.thaw_pipeline import compile_pipeline

    with tempfile.TemporaryDirectory(prefix="thaw-compile-") as tmp:
        text = compile_pipeline(Path(tmp) / PACKAGE_NAME, settings).read_text()
    spec = next(yaml.safe_load_all(text))
    inputs = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    types = {k: v["parameterType"] for k, v in inputs.items()}
    defaults = {k: v["defaultValue"] for k, v in inputs.items() if "defaultValue" in v}
    return CompiledPipeline(text=text, name=spec["pipelineInfo"]["name"],
                            parameter_types=types, defaults=typed_parameters(defaults, types))


def read_params_file(path: Path | None) -> dict[str, Any]:
    """A YAML mapping of parameter name to value (``--params-file``)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ThawError(f"cannot read parameters file {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ThawError(f"parameters file {path}: expected a mapping of name: value")
    return data


def split_pairs(pairs: list[str]) -> dict[str, str]:
    """``--param name=value`` pairs, values kept as text (typed later from the spec)."""
    result: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ThawError(f"parameter {pair!r} must look like name=value")
        result[name.strip()] = value
    return result


def typed_parameters(raw: dict[str, Any], types: dict[str, str]) -> dict[str, Any]:
    """Each value converted to the type the pipeline declares for it (``"96"`` -> 96 for an
    integer, ``"1e-3"`` -> 0.001 for a number, ``"123"`` stays text for a string); unknown
    names and values of the wrong type are refused, naming the parameter."""
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise ThawError(f"unknown pipeline parameter(s) {unknown}; "
                        f"the pipeline takes {sorted(types)}")
    return {name: _convert(name, value, types[name]) for name, value in raw.items()}


def checked_parameters(raw: dict[str, Any], compiled: CompiledPipeline) -> dict[str, Any]:
    """``raw`` typed as the pipeline declares it, then the run's whole parameter set (the
    spec's defaults for what ``raw`` leaves out) checked by ``thaw.params``: bad values are
    refused here, before anything connects, uploads or starts."""
    typed = typed_parameters(raw, compiled.parameter_types)
    check_pipeline_parameters({**compiled.defaults, **typed})
    return typed


def _convert(name: str, value: Any, kind: str) -> Any:
    try:
        if kind == "STRING":
            if isinstance(value, dict | list):
                raise ValueError
            return value if isinstance(value, str) else _text(value)
        if kind == "BOOLEAN":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        if kind == "NUMBER_INTEGER":
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, int | float) or number != int(number):
                raise ValueError
            return int(number)
        if kind == "NUMBER_DOUBLE":
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
    except (TypeError, ValueError, OverflowError):
        expected = _TYPE_NAMES.get(kind, kind)
        raise ThawError(f"parameter {name} must be {expected}, got {value!r}") from None
    return value  # a type this version does not know (struct/list): passed through


def _text(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)

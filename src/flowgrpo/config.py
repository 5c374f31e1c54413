"""Typed configs: YAML files merged onto dataclass schemas with OmegaConf.

OmegaConf structured configs reject unknown keys and values of the wrong type; we turn its
exceptions into one line that names the key and the fix. Command-line overrides use dotted
keys: `flowgrpo train configs/demo.yaml train.lr=1e-4 sample.group_size=8`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if "Key" in msg and "not in" in msg or "ConfigKeyError" in type(exc).__name__:
        return ConfigError(f"{source}: unknown config key '{key}' ({msg}); check the spelling against docs/configs.md")
    if "Value" in msg or "ValidationError" in type(exc).__name__:
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {msg} (key '{key}')")


def _is_mapping_field(node) -> bool:
    """A `dict[str, X]` field (not a nested dataclass): a value given for it replaces the default."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def _clear_replaced_mappings(base: DictConfig, new: DictConfig) -> None:
    """Empty every mapping field that `new` sets, so the merge replaces it: a file saying
    `reward.weights: {ocr: 1.0}` must not keep the default's `shapes_partial` beside it."""
    for key in new:
        if key not in base:
            continue
        node = base._get_node(key)
        if _is_mapping_field(node):
            base[key] = {}
        elif isinstance(node, DictConfig) and isinstance(new._get_node(key), DictConfig):
            _clear_replaced_mappings(node, new[key])


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Merge YAML `path` and dotted `overrides` onto `schema`'s defaults; return a dataclass."""
    base = OmegaConf.structured(schema)
    source = "defaults"
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file such as configs/demo.yaml")
            source = str(path)
            loaded = OmegaConf.load(path)
            if loaded is None:
                loaded = OmegaConf.create({})
            _clear_replaced_mappings(base, loaded)
            base = OmegaConf.merge(base, loaded)
        for ov in overrides or []:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} must look like key.sub=value")
            source = f"override {ov!r}"
            key = ov.split("=", 1)[0].strip()
            # `reward.weights={ocr: 1.0}` replaces the mapping; `reward.weights.ocr=1.0` adds to it
            if _is_mapping_field(OmegaConf.select(base, key, throw_on_missing=False)):
                OmegaConf.update(base, key, {}, merge=False)
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([ov]))
        return OmegaConf.to_object(base)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

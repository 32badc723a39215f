"""Command-line and YAML parsing of experiment configs (Hydra's compose API behind our own checks).

``parse_experiment("ppo", ["actor.path=/ckpt", "ppo.kl_ctl=0.05"], yaml_path="configs/ppo.yaml")``
returns a ``PPOConfig`` instance. Every user mistake becomes a ``UserError`` naming the key:
unknown keys, wrong types, ``+key``/``++key``/``~key`` overrides (Hydra would silently accept
``+extra=1`` on a structured config), and malformed YAML (file and line).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from reallm.config.schema import EXPERIMENTS
from reallm.errors import UserError

_OVERRIDE_RE = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$", re.S)


def experiment_of_yaml(path: str) -> tuple[str, dict]:
    """Read a YAML experiment file; its ``experiment:`` key (or the file name) names the experiment."""
    import yaml  # local: only the CLIs need it

    if not os.path.exists(path):
        raise UserError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    exp = data.pop("experiment", None) or os.path.splitext(os.path.basename(path))[0].split("_")[0]
    if exp not in EXPERIMENTS:
        raise UserError(f"{path}: set `experiment:` to one of {sorted(EXPERIMENTS)} (got {exp!r})")
    return exp, data


def _check_override_syntax(overrides: list[str]) -> None:
    for o in overrides:
        if o.startswith(("+", "~")):
            raise UserError(f"override {o!r}: adding (+/++) or deleting (~) keys is not allowed; every key "
                            f"already exists in the experiment's schema — write it as key=value")
        if not _OVERRIDE_RE.match(o):
            raise UserError(f"override {o!r}: expected key=value (e.g. actor.path=/ckpt/dir)")


def _describe_omegaconf_error(e: Exception, where: str) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).split("\n")[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"{where}: unknown key {key!r}" if key else f"{where}: {msg}"
    if key:
        return f"{where}: key {key!r}: {msg}"
    return f"{where}: {msg}"


def parse_experiment(exp: str, overrides: list[str], yaml_path: Optional[str] = None,
                     yaml_data: Optional[dict] = None) -> Any:
    """Schema defaults ← YAML file ← ``key=value`` overrides, type-checked; returns the dataclass instance."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if exp not in EXPERIMENTS:
        raise UserError(f"unknown experiment {exp!r}; choose one of {', '.join(EXPERIMENTS)}")
    _check_override_syntax(overrides)
    cfg = OmegaConf.structured(EXPERIMENTS[exp])
    if yaml_path is not None and yaml_data is None:
        exp_in_file, yaml_data = experiment_of_yaml(yaml_path)
        if exp_in_file != exp:
            raise UserError(f"{yaml_path}: is a {exp_in_file!r} config, not {exp!r}")
    if yaml_data:
        try:
            cfg = OmegaConf.merge(cfg, yaml_data)
        except OmegaConfBaseException as e:
            raise UserError(_describe_omegaconf_error(e, yaml_path or "config")) from None

    name = f"reallm_{exp}_{os.getpid()}"
    ConfigStore.instance().store(name=name, node=cfg)
    try:
        with initialize(version_base=None, config_path=None):
            composed = compose(config_name=name, overrides=list(overrides))
    except HydraException as e:
        cause = e.__cause__ or e
        bad = _which_override(str(e), overrides)
        if isinstance(cause, OmegaConfBaseException):
            raise UserError(_describe_omegaconf_error(cause, f"override {bad!r}" if bad else "overrides")) from None
        msg = str(e).splitlines()[0]
        if "Ambiguous value" in msg:
            msg += " — write lists in brackets, e.g. actor_gen.device_mesh=[0,1,2,3]"
        raise UserError(f"override {bad!r}: {msg}" if bad else msg) from None
    except OmegaConfBaseException as e:
        raise UserError(_describe_omegaconf_error(e, "overrides")) from None
    try:
        obj = OmegaConf.to_object(composed)
    except OmegaConfBaseException as e:
        raise UserError(_describe_omegaconf_error(e, "config")) from None
    _normalise_empty_paths(obj)
    return obj


def _which_override(message: str, overrides: list[str]) -> Optional[str]:
    m = re.search(r"override '([^']+)'", message) or re.search(r"Could not override '([^']+)'", message)
    if m:
        for o in overrides:
            if o.split("=", 1)[0] == m.group(1):
                return o
        return m.group(1)
    for o in overrides:
        if o.split("=", 1)[0] in message:
            return o
    return None


def _normalise_empty_paths(obj: Any) -> None:
    """``actor.path=$UNSET_VAR`` arrives as an empty string; treat it as not given."""
    import dataclasses

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _normalise_empty_paths(v)
        elif f.name.endswith("path") and v == "":
            setattr(obj, f.name, None)


def config_to_dict(obj: Any) -> dict:
    """A plain JSON-able dict of a config instance (enums as their values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(obj), enum_to_str=True)


def config_from_dict(exp: str, d: dict) -> Any:
    """Rebuild the typed config of an experiment from ``config_to_dict``'s output (e.g. plan.json's)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if exp not in EXPERIMENTS:
        raise UserError(f"unknown experiment {exp!r}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EXPERIMENTS[exp]), d))
    except OmegaConfBaseException as e:
        raise UserError(_describe_omegaconf_error(e, "plan config")) from None

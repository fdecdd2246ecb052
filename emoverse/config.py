"""Recipes: YAML files checked against dataclass schemas (unknown keys and wrong types fail up front),
with `key=value` command-line overrides (OmegaConf dotlist syntax, e.g. `stages.0.steps=10`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class RecipeError(ValueError):
    pass


def resolve_recipe(name_or_path: str | os.PathLike, folder: Path) -> Path:
    """A recipe path, or the name of a shipped recipe in `folder` (`nano-quick` -> folder/nano-quick.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = folder / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(x.stem for x in folder.glob("*.yaml"))
    raise RecipeError(f"{name_or_path}: no such recipe file or shipped recipe (shipped: {', '.join(known)})")


def load_config(
    schema: type[T],
    path: str | os.PathLike | dict | None,
    overrides: list[str] | None = None,
    where: str | None = None,
) -> T:
    """A typed config from a YAML file (or an already-read mapping, named by `where` in errors) and overrides."""
    try:
        cfg = OmegaConf.structured(schema)
        if isinstance(path, dict):
            cfg = OmegaConf.merge(cfg, OmegaConf.create(path))
        elif path is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise RecipeError(f"override {bad[0]!r} is not key=value")
            for item in overrides:
                key, value = item.split("=", 1)
                # update() (unlike from_dotlist) walks list indices: `stages.1.steps=5`
                OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True, force_add=False)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError) as e:
        where = f"{where}: " if where else (f"{path}: " if path is not None and not isinstance(path, dict) else "")
        key = getattr(e, "full_key", None)
        msg = str(e).split("\n")[0]
        raise RecipeError(f"{where}{key + ': ' if key else ''}{msg}") from None


def to_yaml(obj) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))

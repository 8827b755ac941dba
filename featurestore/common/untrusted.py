"""Files a user receives, read with one policy: nothing in them runs, and whatever is wrong with one is
a single line naming the file and the remedy.

- YAML (configs, prompts): `yaml.safe_load`, plain data only; a problem names the file, line and column.
- JSON that kdstore wrote (run summaries, sidecars, sweep records): damage is named with its remedy.
- Checkpoints: `torch.load(weights_only=True)`, tensors and plain data only; anything else is refused.
- Teachers (a hub id or a folder in Hugging Face format): every transformers call passes
  `trust_remote_code=False`, and weights come from safetensors only (a pickled `pytorch_model.bin`
  can run code when it is read). A folder that ships its own code (`auto_map` in its config) or
  only pickled weights is refused before transformers reads any of it.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from featurestore.common.errors import KdstoreError


class ReceivedFileError(KdstoreError, ValueError):
    """A file a user received is damaged, or holds something kdstore does not run; the message names it."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- YAML and JSON ----------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping (safe_load: plain data, no tags that build objects); a problem is one line naming
    the file, line and column."""
    import yaml

    from featurestore.common.options import ConfigError
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: {problem} (not valid YAML for kdstore)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (YAML expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def read_json(path: str | Path, remedy: str, kind: type = dict) -> Any:
    """A JSON document kdstore wrote (of type `kind`); a damaged or edited one is one line naming the
    file and `remedy` (what to do about it)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReceivedFileError(f"{path}: not found; {remedy}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ReceivedFileError(f"{path}: damaged (not the JSON kdstore writes: {first_line(e)}); {remedy}") from None
    if not isinstance(value, kind):
        raise ReceivedFileError(f"{path}: damaged (a JSON {type(value).__name__} where kdstore writes a "
                                f"{kind.__name__}); {remedy}")
    return value


# ---- checkpoints -------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint's tensors and plain data; anything else is refused, and nothing in it runs."""
    import torch
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ReceivedFileError(f"{path}: refused: it holds objects other than tensors and plain data, and kdstore "
                                f"loads nothing that could run code ({first_line(e)[:200]}); use a checkpoint "
                                "written by `trainer fit`") from None
    except FileNotFoundError:
        raise ReceivedFileError(f"{path}: not found") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ReceivedFileError(f"{path}: cannot be read as a checkpoint ({first_line(e)[:200]})") from None


# ---- teachers ----------------------------------------------------------------------------------
SAFE_WEIGHTS = ("*.safetensors",)
PICKLED_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_teacher_folder(folder: Path, weights: bool = True) -> None:
    """Refuse a teacher folder that carries code of its own or only pickled weights, naming what it
    holds. weights: the caller loads the model's weights (a config alone needs none)."""
    config = folder / "config.json"
    if not config.is_file():
        raise ReceivedFileError(f"{folder} holds no config.json: a teacher folder is what save_pretrained writes "
                                "(config.json, model.safetensors, preprocessor_config.json)")
    data = read_json(config, "the folder is not a checkpoint save_pretrained wrote")
    code = sorted(p.name for p in folder.glob("*.py"))
    for key in ("auto_map", "custom_pipelines"):
        if key in data or any(isinstance(v, dict) and key in v for v in data.values()):
            raise ReceivedFileError(f"{config} names code of its own ({key}{': ' + ', '.join(code) if code else ''}); "
                                    "kdstore never runs code from a teacher folder (trust_remote_code stays off): "
                                    "use a checkpoint of an architecture transformers ships")
    if weights and not any(any(folder.glob(p)) for p in SAFE_WEIGHTS):
        pickled = sorted({q.name for p in PICKLED_WEIGHTS for q in folder.glob(p)})
        what = (f"only pickled weights ({', '.join(pickled)}), which can run code when they are read" if pickled
                else "no weights (model.safetensors)")
        raise ReceivedFileError(f"{folder} holds {what}; kdstore loads teacher weights from safetensors only: "
                                "convert them where you trust the file (load it, then save_pretrained writes "
                                "model.safetensors)")


def hf_load(cls, spec: str, revision: str | None = None, weights: bool = False, **kw):
    """transformers' from_pretrained of `cls` under kdstore's policy: trust_remote_code off on every call, a local
    folder checked first (`check_teacher_folder`), model weights from safetensors only (weights=True)."""
    if Path(spec).is_dir():
        check_teacher_folder(Path(spec), weights)
    if weights:
        kw["use_safetensors"] = True
    return cls.from_pretrained(spec, revision=revision, trust_remote_code=False, **kw)

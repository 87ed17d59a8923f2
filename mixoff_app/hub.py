"""Turn a ``--model`` value into a local folder: ``tiny``, a local path, or a Hugging Face hub repo id.

Hub downloads fetch only what the runtime reads (config, tokenizer, safetensors), show progress bars,
honour ``HF_TOKEN``, and turn offline / gated / missing-repo failures into messages that say what to do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REFERENCE_REPO = "lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo"
BASE_INSTRUCT = "mistralai/Mixtral-8x7B-Instruct-v0.1"
# Where the tokenizer comes from when a checkpoint folder carries none.
TOKENIZER_FALLBACK = {REFERENCE_REPO: BASE_INSTRUCT}
ALLOW = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "*.jinja"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "*.jinja"]
ASSETS = Path(__file__).resolve().parent.parent / "assets"


class ModelNotAvailable(RuntimeError):
    """The model cannot be had here (offline, gated, not found): the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str            # for display
    repo_id: Optional[str] = None


def tiny_path() -> Path:
    """The shipped trained demo model when present, else the random tiny model built on first use."""
    shipped = ASSETS / "tiny-chat"
    if (shipped / "model.safetensors").exists():
        return shipped
    from .tiny import ensure_tiny
    return ensure_tiny()


def resolve(model: str, progress: Callable[[str], None] = print,
            precheck: Optional[Callable[[Path], None]] = None) -> ResolvedModel:
    """``precheck(folder)`` runs on a hub model's config.json before any weight is downloaded (and on a
    local folder before it is read): it may refuse, e.g. when the model cannot fit this machine."""
    if model == "tiny":
        p = tiny_path()
        return ResolvedModel(p, "tiny-chat (embedded demo model)" if p.name == "tiny-chat" else "tiny (random weights)")
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotAvailable(f"{local} is a file; pass the checkpoint folder that holds config.json")
        if precheck is not None and (local / "config.json").exists():
            precheck(local)
        return ResolvedModel(local, local.name)
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ModelNotAvailable(f"{model!r} is neither a local folder, 'tiny', nor a hub repo id (owner/name)")
    if precheck is not None:
        precheck(download(model, ["config.json"], progress, announce=False))
    return ResolvedModel(download(model, ALLOW, progress), model, repo_id=model)


def download(repo_id: str, allow: list[str], progress: Callable[[str], None] = print,
             announce: bool = True) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if announce and not offline:
        size = remote_size(repo_id, allow, token)
        if size:
            progress(f"fetching {repo_id}: {size[0]} files, {size[1] / 1e9:.2f} GB (already cached files are skipped)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow, token=token))
    except hf_errors.GatedRepoError:
        raise ModelNotAvailable(f"{repo_id} is gated: accept its licence on its hub page, then set HF_TOKEN "
                                f"to a token of that account") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotAvailable(f"{repo_id} was not found on the hub (or is private: set HF_TOKEN)") from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelNotAvailable(
            f"{repo_id} is not in the local hub cache and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no network'}): download it on a connected machine "
            f"(huggingface-cli download {repo_id}), pass a local folder with --model, or use --model tiny") from None
    except (OSError, hf_errors.HfHubHTTPError) as e:
        raise ModelNotAvailable(f"could not download {repo_id}: {e}. Check the network, or use --model tiny") from None


def remote_size(repo_id: str, allow: list[str], token) -> Optional[tuple[int, int]]:
    """(files, bytes) the download will fetch, or None when the hub cannot say (offline, no access)."""
    import fnmatch
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(repo_id, files_metadata=True, token=token)
    except Exception:
        return None
    files = [s for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, pat) for pat in allow)]
    return len(files), sum(s.size or 0 for s in files)


def tokenizer_source(folder: Path, repo_id: Optional[str], override: Optional[str],
                     progress: Callable[[str], None] = print) -> Path:
    """The checkpoint folder if it carries a tokenizer, else the base model's tokenizer files."""
    if override:
        p = Path(override).expanduser()
        return p if p.exists() else download(override, TOKENIZER_FILES, progress)
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
        return folder
    base = TOKENIZER_FALLBACK.get(repo_id or "")
    if base is None:
        import json

        from .families import DEFAULT_FAMILY, FAMILIES
        cfg = json.loads((folder / "config.json").read_text())
        fam = FAMILIES.get(cfg.get("model_type", DEFAULT_FAMILY))
        base = cfg.get("_name_or_path") or (fam.example if fam else BASE_INSTRUCT)
    progress(f"the checkpoint has no tokenizer; using {base}'s")
    return download(base, TOKENIZER_FILES, progress)

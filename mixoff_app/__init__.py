"""mixoff: Mixture-of-Experts models (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2) with offloaded experts and a live
view of the device expert cache."""
import os as _os

__version__ = "0.1.0"


def _expandable_segments() -> None:
    """Ask torch's CUDA allocator for expandable segments (read when CUDA first initialises, so set on import):
    activations of varying length then reuse one growing segment instead of fragmenting the small free
    memory left beside the expert slots. A user's own setting, under either variable name, is kept."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        conf = _os.environ.get(name)
        if conf is not None:
            if "expandable_segments" not in conf:
                _os.environ[name] = f"{conf},expandable_segments:True" if conf.strip() else "expandable_segments:True"
            return
    _os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


_expandable_segments()

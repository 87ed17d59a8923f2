"""mixoff: Mixtral with offloaded MoE experts and a live view of its device expert cache."""

__version__ = "0.1.0"

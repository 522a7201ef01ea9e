"""convserve on Ray Serve (the `ray` extra): one deployment per model behind one ingress, reached
through Ray Serve's gRPC proxy with the same `inference.GRPCInferenceService` as `convserve serve`.

Import paths for Serve: `convserve.ray:app` (settings from `CONVSERVE_*` variables) and
`convserve.ray:build_app` (an application builder taking the settings as arguments). Importing
this package does not import Ray; reading `app` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "build_app"]


def build_app(args: dict[str, Any] | None = None):
    """Serve's application builder (see convserve.ray.serving.build_app)."""
    from convserve.ray.serving import build_app as build

    return build(args)


def __getattr__(name: str):
    if name == "app":  # built on first access, so that importing convserve.ray stays light
        return build_app()
    raise AttributeError(f"module 'convserve.ray' has no attribute {name!r}")

"""Aliases carry the serving state (stages are deprecated in MLflow 3).

``challenger`` is the newest registered version, ``champion`` the one serving, ``previous`` the champion
before it, so a rollback is one alias move and a second rollback undoes the first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mtl_core.registry.store import (
    RegistryError,
    mlflow_errors,
    quote,
)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


def current_alias(client: MlflowClient, model_name: str, alias: str) -> int | None:
    """The version holding ``alias``, or None (also when the model is not registered yet).

    ``get_model_version_by_alias`` is the way to read aliases: ``search_model_versions`` returns versions
    without theirs in MLflow 3.17.
    """
    try:
        return int(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in exc.message:
            return None
        raise


# --------------------------------------------------------------------------------------------------
# Aliases: promote, rollback.
def require_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = [m.name for m in client.search_registered_models(max_results=20)]
        raise RegistryError(
            f"no registered model named {model_name!r} at {client.tracking_uri} "
            f"(registered: {', '.join(names) or 'none'}); the DAG's register step creates it"
        ) from exc


def require_version(client: MlflowClient, model_name: str, version: int | str):
    require_model(client, model_name)
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        versions = sorted(int(mv.version) for mv in client.search_model_versions(f"name = {quote(model_name)}"))
        shown = ", ".join(map(str, versions[-10:])) or "none"
        raise RegistryError(f"model {model_name!r} has no version {version} (versions: {shown})") from exc


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stamp(client: MlflowClient, model_name: str, version: int, kind: str, actor: str, why: str, replaced) -> str:
    at = _now()
    tags = {
        "promotion.by": actor,
        "promotion.why": why,
        "promotion.at": at,
        "promotion.kind": kind,
        "promotion.replaced": str(replaced) if replaced is not None else "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return at


def make_champion(client: MlflowClient, model_name: str, version: int | str, actor: str, why: str) -> dict[str, Any]:
    """Make ``version`` the champion; the champion it replaces becomes ``previous``.

    ``previous`` is moved first: should the process die between the two writes, both aliases name the old
    champion, which keeps serving (never a state with the new champion and no way back).
    Promoting the current champion again changes nothing.
    """
    with mlflow_errors(f"promoting {model_name} v{version}"):
        target = int(require_version(client, model_name, version).version)
        old = current_alias(client, model_name, CHAMPION)
        if old == target:
            return {
                "model": model_name,
                "champion": target,
                "previous": current_alias(client, model_name, PREVIOUS),
                "changed": False,
            }
        if old is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, str(old))
        client.set_registered_model_alias(model_name, CHAMPION, str(target))
        at = _stamp(client, model_name, target, "promote", actor, why, old)
        return {"model": model_name, "champion": target, "previous": old, "changed": True, "at": at}


def rollback(client: MlflowClient, model_name: str, actor: str, why: str) -> dict[str, Any]:
    """Swap ``champion`` and ``previous``: the previous champion serves again, and a second rollback undoes
    the first. The champion moves first, since that is the write that matters to serving."""
    with mlflow_errors(f"rolling back {model_name}"):
        require_model(client, model_name)
        back = current_alias(client, model_name, PREVIOUS)
        if back is None:
            raise RegistryError(
                f"cannot roll back {model_name!r}: no version holds the 'previous' alias (nothing was promoted "
                "over another champion yet); use mtl promote --version N to choose a version"
            )
        current = current_alias(client, model_name, CHAMPION)
        client.set_registered_model_alias(model_name, CHAMPION, str(back))
        if current is not None and current != back:
            client.set_registered_model_alias(model_name, PREVIOUS, str(current))
        at = _stamp(client, model_name, back, "rollback", actor, why, current)
        return {"model": model_name, "champion": back, "previous": current, "changed": current != back, "at": at}

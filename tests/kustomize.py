"""`kustomize build` for what deploy/ uses, in Python, so the manifests are checked on a machine without kubectl.

Resources (files or kustomization folders), components, and patches by path: strategic merge patches,
`$patch: delete` included. Lists of the core kinds merge by their Kubernetes merge key (containers by
name, volume mounts by path...); a custom resource's lists are replaced. Any other kustomization field is
refused, so a kustomization that grows a feature this does not know fails instead of rendering wrong.
tests/test_deploy.py compares its output with `kubectl kustomize` where kubectl is installed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

KNOWN = {"apiVersion", "kind", "resources", "components", "patches"}
# The lists of the core kinds that merge item by item, and the key that pairs their items
# (Kubernetes' patchMergeKey); any other list is replaced by the patch's.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "imagePullSecrets": "name", "volumeMounts": "mountPath", "ports": "containerPort"}
CORE_GROUPS = {"v1", "apps/v1", "autoscaling/v2", "policy/v1", "batch/v1", "networking.k8s.io/v1"}


def _kustomization(folder: Path) -> dict:
    doc = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(doc) - KNOWN
    assert not unknown, f"{folder}/kustomization.yaml: {sorted(unknown)} not understood by tests/kustomize.py"
    for patch in doc.get("patches", []):
        assert set(patch) == {"path"}, f"{folder}: only patches by path are understood, not {patch}"
    return doc


def _merge(base, patch, core: bool):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None:
                out.pop(key, None)
            elif key in out and isinstance(out[key], list) and isinstance(value, list) and core and key in MERGE_KEYS:
                out[key] = _merge_list(out[key], value, MERGE_KEYS[key], core)
            elif key in out:
                out[key] = _merge(out[key], value, core)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def _merge_list(base: list, patch: list, key: str, core: bool) -> list:
    out = [copy.deepcopy(item) for item in base]
    for item in patch:
        match = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
        if match is None:
            out.append(copy.deepcopy(item))
        else:
            out[match] = _merge(out[match], item, core)
    return out


def _patch(objects: list[dict], path: Path) -> list[dict]:
    for patch in yaml.safe_load_all(path.read_text()):
        target = (patch["kind"], patch["metadata"]["name"])
        found = [i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == target]
        assert len(found) == 1, f"{path}: patch target {target} found {len(found)} times"
        i = found[0]
        if patch.get("$patch") == "delete":
            del objects[i]
        else:
            objects[i] = _merge(objects[i], patch, objects[i]["apiVersion"] in CORE_GROUPS)
    return objects


def render(folder: Path, _component: bool = False) -> list[dict]:
    """The objects `kustomize build folder` makes."""
    folder = Path(folder)
    doc = _kustomization(folder)
    kind = doc.get("kind", "Kustomization")
    assert kind == ("Component" if _component else "Kustomization"), f"{folder} is a {kind}"
    objects: list[dict] = []
    for res in doc.get("resources", []):
        path = folder / res
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for comp in doc.get("components", []):
        cdoc = _kustomization(folder / comp)
        for res in cdoc.get("resources", []):
            objects += [d for d in yaml.safe_load_all((folder / comp / res).read_text()) if d]
        for patch in cdoc.get("patches", []):
            objects = _patch(objects, folder / comp / patch["path"])
    for patch in doc.get("patches", []):
        objects = _patch(objects, folder / patch["path"])
    ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), f"{folder}: an object made twice"
    return objects


def files(folder: Path, _component: bool = False) -> set[Path]:
    """Every file `render(folder)` reads (kustomization files included)."""
    folder = Path(folder)
    doc = _kustomization(folder)
    out = {folder / "kustomization.yaml"}
    for res in doc.get("resources", []):
        path = folder / res
        out |= files(path) if path.is_dir() else {path}
    for comp in doc.get("components", []):
        out |= files(folder / comp, True)
    out |= {folder / p["path"] for p in doc.get("patches", [])}
    return {p.resolve() for p in out}


def canonical(objects: list[dict]) -> dict[tuple[str, str], str]:
    """Objects keyed by (kind, name), their lists of objects in a fixed order: two renderings that differ
    only in the order a merge left such lists in compare equal."""
    def norm(x):
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, list):
            items = [norm(v) for v in x]
            if all(isinstance(v, dict) for v in items):
                return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
            return items
        return x
    return {(o["kind"], o["metadata"]["name"]): json.dumps(norm(o), sort_keys=True) for o in objects}

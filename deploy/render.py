"""Render a kustomization directory offline, for CI, without the kustomize binary.

`kubectl apply -k DIR` is what users run; this renderer exists so that CI can check the
same objects with no cluster and no kustomize binary. It implements only the subset of
kustomize that deploy/kubernetes uses, and refuses anything else with an error, so a
kustomization can never silently render differently here than in kustomize:

- `resources`: YAML files (one or more documents) and directories holding a
  kustomization.yaml, rendered recursively, in the listed order.
- `patches`: entries with `path` (a file holding a list of RFC 6902 JSON-patch operations:
  add, remove, replace, test) and `target` (kind and name; group and version optional).
  Operations address list items by index, exactly as kustomize's JSON-6902 patches do.
- `images`: entries with `name` and any of `newName`, `newTag`, `digest`, applied to every
  `containers[].image` and `initContainers[].image` at any depth, kinds included that
  kustomize knows nothing about (RayService), as kustomize's image transformer does.

Order of work matches kustomize: build every resource (sub-kustomizations fully built),
then apply this level's patches, then its images. Objects come out in resource order;
kustomize sorts them by kind, which does not change what `kubectl apply` creates.

Usage: python deploy/render.py deploy/kubernetes/overlays/cpu-demo > rendered.yaml
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
KUSTOMIZATION_FILE = "kustomization.yaml"

Manifest = dict[str, Any]


class RenderError(ValueError):
    """A kustomization uses something this renderer does not implement, or is wrong."""


def render(directory: str | Path) -> list[Manifest]:
    """Build the kustomization in `directory` and return its objects."""
    directory = Path(directory)
    kustomization = _load_kustomization(directory)
    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        objects.extend(_load_resource(directory, entry))
    for patch in kustomization.get("patches", []):
        _apply_patch_entry(directory, patch, objects)
    for image in kustomization.get("images", []):
        _apply_image(image, objects)
    return objects


def _load_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / KUSTOMIZATION_FILE
    if not path.is_file():
        raise RenderError(
            f"{directory} has no {KUSTOMIZATION_FILE}; pass a directory that holds one "
            f"(for example deploy/kubernetes/overlays/cpu-demo)"
        )
    data = yaml.safe_load(path.read_text()) or {}
    unsupported = set(data) - SUPPORTED_FIELDS
    if unsupported:
        raise RenderError(
            f"{path} uses {sorted(unsupported)}, which deploy/render.py does not implement; "
            f"it supports only {sorted(SUPPORTED_FIELDS)}. Express the change as a JSON-6902 "
            f"patch, or implement the field here so CI renders what kustomize renders"
        )
    return data


def _load_resource(directory: Path, entry: str) -> list[Manifest]:
    path = (directory / entry).resolve()
    if path.is_dir():
        return render(path)
    if not path.is_file():
        raise RenderError(f"{directory / KUSTOMIZATION_FILE} lists resource {entry!r}, but {path} does not exist")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _apply_patch_entry(directory: Path, entry: dict[str, Any], objects: list[Manifest]) -> None:
    if set(entry) != {"path", "target"}:
        raise RenderError(
            f"patch entry {entry} in {directory} must have exactly `path` and `target`; "
            f"inline `patch:` and strategic-merge patches are not implemented here"
        )
    operations = yaml.safe_load((directory / entry["path"]).read_text())
    if not isinstance(operations, list):
        raise RenderError(
            f"{directory / entry['path']} must hold a list of JSON-6902 operations "
            f"(- op: replace / path: /spec/... / value: ...), got {type(operations).__name__}"
        )
    matches = [obj for obj in objects if _matches(obj, entry["target"])]
    if not matches:
        raise RenderError(
            f"patch {entry['path']} in {directory} targets {entry['target']}, which matches no "
            f"resource; resources are {[(o['kind'], o['metadata']['name']) for o in objects]}"
        )
    for obj in matches:
        for operation in operations:
            try:
                apply_json_patch_operation(obj, operation)
            except RenderError as err:
                raise RenderError(f"{directory / entry['path']}: {err}") from None


def _matches(obj: Manifest, target: dict[str, Any]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "group": group,
        "version": version,
    }
    unknown = set(target) - set(wanted)
    if unknown:
        raise RenderError(f"patch target fields {sorted(unknown)} are not implemented; use kind, name, group, version")
    return all(wanted[key] == value for key, value in target.items())


def apply_json_patch_operation(document: Any, operation: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation in place (add, remove, replace, test)."""
    op = operation.get("op")
    if op not in {"add", "remove", "replace", "test"}:
        raise RenderError(f"JSON-patch op {op!r} is not implemented; use add, remove, replace or test")
    tokens = _pointer_tokens(operation["path"])
    if not tokens:
        raise RenderError("JSON-patch on the whole document ('' path) is not supported; address a field")
    parent = _resolve(document, tokens[:-1], operation["path"])
    last = tokens[-1]
    value = copy.deepcopy(operation.get("value"))

    if isinstance(parent, list):
        if op == "add":
            index = len(parent) if last == "-" else _list_index(parent, last, operation["path"], allow_end=True)
            parent.insert(index, value)
            return
        index = _list_index(parent, last, operation["path"], allow_end=False)
    elif isinstance(parent, dict):
        if op == "add":
            parent[last] = value
            return
        if last not in parent:
            raise RenderError(f"{op} {operation['path']}: no field {last!r}; fields there are {sorted(parent)}")
        index = last
    else:
        raise RenderError(f"{op} {operation['path']}: parent is a {type(parent).__name__}, not an object or list")

    if op == "remove":
        del parent[index]
    elif op == "replace":
        parent[index] = value
    elif parent[index] != value:
        raise RenderError(
            f"test {operation['path']} failed: found {parent[index]!r}, expected {value!r}; the "
            f"base changed under this patch, so fix the indices in the patch"
        )


def _pointer_tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise RenderError(f"JSON pointer {pointer!r} must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _resolve(document: Any, tokens: list[str], pointer: str) -> Any:
    node = document
    for token in tokens:
        if isinstance(node, list):
            node = node[_list_index(node, token, pointer, allow_end=False)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise RenderError(f"path {pointer}: no {token!r} to descend into")
    return node


def _list_index(items: list, token: str, pointer: str, allow_end: bool) -> int:
    limit = len(items) if allow_end else len(items) - 1
    if not token.isdigit() or int(token) > limit:
        raise RenderError(f"path {pointer}: index {token!r} is out of range for a list of {len(items)}")
    return int(token)


def _apply_image(image: dict[str, Any], objects: list[Manifest]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise RenderError(f"images entry {image} has {sorted(unknown)}; supported: name, newName, newTag, digest")
    for obj in objects:
        for container in _containers(obj):
            name, suffix = _split_image(container.get("image", ""))
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                suffix = "@" + image["digest"]
            elif "newTag" in image:
                suffix = ":" + image["newTag"]
            container["image"] = name + suffix


def _split_image(ref: str) -> tuple[str, str]:
    """Split an image reference into its name and its ':tag' or '@digest' suffix ('' if none)."""
    if "@" in ref:
        at = ref.index("@")
        return ref[:at], ref[at:]
    slash, colon = ref.rfind("/"), ref.rfind(":")
    if colon > slash:  # a colon before the last slash is a registry port, not a tag
        return ref[:colon], ref[colon:]
    return ref, ""


def _containers(node: Any):
    """Every container dict under `containers`/`initContainers`, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"containers", "initContainers"} and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


class _BlockStringDumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2, keys.yaml) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStringDumper.add_representer(str, _represent_str)


def to_yaml(objects: list[Manifest]) -> str:
    return yaml.dump_all(objects, Dumper=_BlockStringDumper, sort_keys=False, explicit_start=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a directory holding kustomization.yaml")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(to_yaml(render(args.directory)))
    except RenderError as err:
        print(f"render.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

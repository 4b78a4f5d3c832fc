"""Turn a pod's container spec into a local process: environment, volumes and path mapping.

The process kubelet runs containers as plain processes on this machine, so paths that a
container expects (``/work``, ``/dev/termination-log``, ``/etc/config/…``) must not touch
the host's root. Instead every *mount path* of the container (and its termination-message
path) is mapped to a directory or file under the pod's directory, and that mapping is
applied to every string the pod receives from the API: ``command``, ``args``, ``env``
values, ``workingDir`` and the text content of ConfigMap/downward-API volume files. A path
is rewritten only at a path boundary (start of the string or after ``=``, ``:``, ``,``,
``;``, whitespace, a quote, a bracket, or ``file://``), so ``s3://bucket/work`` is left alone
while ``/work/out``, ``--out=/work/out`` and ``file:///work/out`` are mapped. Paths outside
any mount are host paths and are left as they are. The mapping is also exported to the
process as JSON in ``BRANCHMERGE_KUBELET_PATH_MAP`` for programs that build paths at run
time.

Everything here is pure except the ``Lookup`` callbacks that read Secrets and ConfigMaps.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PATH_MAP_ENV = "BRANCHMERGE_KUBELET_PATH_MAP"
POD_DIR_ENV = "BRANCHMERGE_KUBELET_POD_DIR"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"

#: (kind, namespace, name) -> the object's ``data`` as text values (Secrets decoded), or None if absent.
Lookup = Callable[[str, str, str], "dict[str, str] | None"]


class NotReadyYet(Exception):
    """A referenced Secret/ConfigMap/key is missing: the container cannot start yet (kubelet retries)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------- path mapping


@dataclass(frozen=True)
class PathMap:
    """Container path -> local path, longest container path first."""

    pairs: tuple[tuple[str, str], ...]

    @staticmethod
    def of(mapping: Mapping[str, str | Path]) -> PathMap:
        items = sorted(
            ((k.rstrip("/") or "/", str(v)) for k, v in mapping.items()), key=lambda kv: -len(kv[0])
        )
        return PathMap(tuple(items))

    def as_dict(self) -> dict[str, str]:
        return dict(self.pairs)

    def path(self, container_path: str) -> str | None:
        """The local path of one absolute container path, or None if it is under no mount."""
        for src, dst in self.pairs:
            if container_path == src or container_path.startswith(src + "/"):
                return dst + container_path[len(src) :]
        return None

    def rewrite(self, text: str) -> str:
        """Rewrite every mount path that appears at a path boundary in ``text``."""
        if not self.pairs or "/" not in text:
            return text
        return self._pattern().sub(lambda m: self.path(m.group(0)) or m.group(0), text)

    def _pattern(self) -> re.Pattern[str]:
        alts = "|".join(re.escape(src) for src, _ in self.pairs)
        # Boundary before: start, a separator, a quote/bracket, or file://. After: end, '/', or a non-path char.
        before = r"(?:(?<=^)|(?<=[=:,;\s'\"(\[{])|(?<=file://))"
        return re.compile(before + rf"(?:{alts})(?:/[^\s'\",;:)\]}}]*)?(?![\w.-])")


# ---------------------------------------------------------------------------- $(VAR) expansion


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes, unknown refs stay."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                j = text.find(")", i + 2)
                if j != -1:
                    name = text[i + 2 : j]
                    out.append(env[name] if name in env else text[i : j + 1])
                    i = j + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------- env


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    """Value of a downward-API ``fieldRef.fieldPath``."""
    meta = pod.get("metadata", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": pod.get("spec", {}).get("nodeName"),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName"),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
    }
    if path not in simple:
        raise NotReadyYet("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")
    return str(simple[path] or "")


def _quantity(q: str) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``64Gi``, ``1e3``) as a number."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}  # fmt: skip
    m = re.fullmatch(r"([0-9.eE+-]+?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(q).strip())
    if not m:
        raise ValueError(f"bad quantity {q!r}")
    return float(m.group(1)) * suffixes.get(m.group(2) or "", 1)


def resource_ref(
    container: Mapping[str, Any], ref: Mapping[str, Any], node_allocatable: Mapping[str, str]
) -> str:
    """Value of a ``resourceFieldRef`` (limits default to the node's allocatable, as on a kubelet)."""
    kind, _, res = str(ref["resource"]).partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(res)
    if value is None:
        value = (resources.get("limits") or {}).get(res) if kind == "requests" else None
    if value is None:
        value = node_allocatable.get(res, "0")
    divisor = _quantity(str(ref.get("divisor") or "1"))
    return str(math.ceil(_quantity(str(value)) / divisor))


def container_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    base: Mapping[str, str],
    lookup: Lookup,
    node_allocatable: Mapping[str, str],
    paths: PathMap | None = None,
) -> dict[str, str]:
    """The process environment: ``base``, then ``envFrom``, then ``env`` (with ``$(VAR)`` expansion).

    ``paths`` rewrites what the pod provides (literal values before expansion, ConfigMap and
    downward-API values), never ``base`` (host values such as PATH) nor Secret values.
    """
    rw = paths.rewrite if paths is not None else (lambda v: v)
    ns = pod["metadata"]["namespace"]
    env = dict(base)
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix") or ""
        for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
            ref = src.get(key)
            if not ref:
                continue
            data = lookup(kind, ns, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise NotReadyYet("CreateContainerConfigError", f'{kind.lower()} "{ref["name"]}" not found')
            for k, v in data.items():
                env[prefix + k] = v if kind == "Secret" else rw(v)
    resolved: dict[str, str] = {}
    for var in container.get("env") or []:
        name = var["name"]
        vf = var.get("valueFrom")
        if vf is None:
            value = expand(rw(var.get("value") or ""), {**env, **resolved})
        elif "fieldRef" in vf:
            value = rw(field_ref(pod, vf["fieldRef"]["fieldPath"]))
        elif "resourceFieldRef" in vf:
            value = resource_ref(container, vf["resourceFieldRef"], node_allocatable)
        else:
            kind, ref = (
                ("Secret", vf["secretKeyRef"])
                if "secretKeyRef" in vf
                else ("ConfigMap", vf["configMapKeyRef"])
            )
            data = lookup(kind, ns, ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                what = (
                    f'{kind.lower()} "{ref["name"]}"'
                    if data is None
                    else f'key "{ref["key"]}" in {kind.lower()} "{ref["name"]}"'
                )
                raise NotReadyYet("CreateContainerConfigError", f"{what} not found")
            value = data[ref["key"]] if kind == "Secret" else rw(data[ref["key"]])
        resolved[name] = value
        env[name] = value
    return env


# ---------------------------------------------------------------------------- volumes


def _write_items(target: Path, data: Mapping[str, bytes], items: list[dict[str, Any]] | None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
    for key, rel in pairs:
        if key not in data:
            continue
        f = target / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data[key])


def _text_rewrite(data: Mapping[str, str], paths: PathMap) -> dict[str, bytes]:
    return {k: paths.rewrite(v).encode() for k, v in data.items()}


def materialize_volumes(
    pod: Mapping[str, Any],
    pod_dir: Path,
    lookup: Lookup,
    raw_lookup: Callable[[str, str, str], dict[str, bytes] | None],
    pvc_dir: Callable[[str, str], Path],
    paths: PathMap,
) -> dict[str, Path]:
    """Create each volume of the pod as a local directory and return name -> directory.

    emptyDir: an empty directory; configMap/secret/downwardAPI/projected: files with the
    data (ConfigMap and downward-API text is path-rewritten, Secrets are written verbatim);
    hostPath: the host path itself; persistentVolumeClaim: ``pvc_dir(namespace, claim)``
    (the bound PV's path, see the kubelet); anything else: an empty directory.
    """
    ns = pod["metadata"]["namespace"]
    out: dict[str, Path] = {}
    for vol in pod.get("spec", {}).get("volumes") or []:
        name = vol["name"]
        d = pod_dir / "volumes" / name
        if "hostPath" in vol:
            d = Path(vol["hostPath"]["path"])
            if vol["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                d.mkdir(parents=True, exist_ok=True)
        elif "persistentVolumeClaim" in vol:
            d = pvc_dir(ns, vol["persistentVolumeClaim"]["claimName"])
            d.mkdir(parents=True, exist_ok=True)
        elif "configMap" in vol or "secret" in vol:
            kind, src = ("ConfigMap", vol["configMap"]) if "configMap" in vol else ("Secret", vol["secret"])
            obj_name = src.get("name") or src.get("secretName")
            _write_source(kind, ns, obj_name, src, d, lookup, raw_lookup, paths)
        elif "downwardAPI" in vol:
            _write_downward(pod, vol["downwardAPI"], d, paths)
        elif "projected" in vol:
            for s in vol["projected"].get("sources") or []:
                if "configMap" in s:
                    _write_source(
                        "ConfigMap", ns, s["configMap"]["name"], s["configMap"], d, lookup, raw_lookup, paths
                    )
                elif "secret" in s:
                    _write_source(
                        "Secret", ns, s["secret"]["name"], s["secret"], d, lookup, raw_lookup, paths
                    )
                elif "downwardAPI" in s:
                    _write_downward(pod, s["downwardAPI"], d, paths)
            d.mkdir(parents=True, exist_ok=True)
        else:  # emptyDir and anything we do not model
            d.mkdir(parents=True, exist_ok=True)
        out[name] = d
    return out


def _write_source(
    kind: str,
    ns: str,
    name: str,
    src: Mapping[str, Any],
    d: Path,
    lookup: Lookup,
    raw_lookup: Callable[[str, str, str], dict[str, bytes] | None],
    paths: PathMap,
) -> None:
    if kind == "Secret":
        data = raw_lookup(kind, ns, name)
    else:
        text = lookup(kind, ns, name)
        data = None if text is None else _text_rewrite(text, paths)
        binary = raw_lookup("ConfigMapBinary", ns, name) if text is not None else None
        if data is not None and binary:
            data.update(binary)
    if data is None:
        if src.get("optional"):
            d.mkdir(parents=True, exist_ok=True)
            return
        raise NotReadyYet("ContainerCreating", f'MountVolume.SetUp failed: {kind.lower()} "{name}" not found')
    _write_items(d, data, src.get("items"))


def _write_downward(pod: Mapping[str, Any], spec: Mapping[str, Any], d: Path, paths: PathMap) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for item in spec.get("items") or []:
        if "fieldRef" in item:
            f = d / item["path"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(paths.rewrite(field_ref(pod, item["fieldRef"]["fieldPath"])))


def container_paths(
    container: Mapping[str, Any], volumes: Mapping[str, Path], container_dir: Path
) -> PathMap:
    """Mount path -> local path for one container, plus its termination-message path."""
    mapping: dict[str, str | Path] = {}
    for m in container.get("volumeMounts") or []:
        local = volumes.get(m["name"])
        if local is None:
            continue
        sub = m.get("subPath")
        target = local / sub if sub else local
        if sub and not target.exists():
            target.mkdir(parents=True, exist_ok=True)
        mapping[m["mountPath"]] = target
    term = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
    mapping[term] = container_dir / "termination-log"
    return PathMap.of(mapping)


def decode_secret(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (data or {}).items()}


def env_json(paths: PathMap) -> str:
    return json.dumps(paths.as_dict(), sort_keys=True)

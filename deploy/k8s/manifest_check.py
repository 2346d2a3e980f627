"""Render every Kubernetes variant of the stack and check it offline.

    python -m deploy.k8s.manifest_check            # all variants, exit 1 on any problem
    python -m deploy.k8s.manifest_check serving-gpu --kubernetes-version 1.32.0

Three checks, none of which needs a cluster:

1. Rendering: each variant is a kustomization, rendered with ``kubectl kustomize``
   (the kustomize built into kubectl, the same code ``kubectl apply -k`` runs).
2. Schemas: built-in kinds against the Kubernetes JSON schemas of a pinned
   version (``kubernetes-validate``, strict: unknown fields are errors); the
   Training Operator's PyTorchJob and TFJob against the CRD schema subsets kept
   in ``deploy/k8s/schemas/`` (their pod templates against the same Kubernetes
   schemas), plus the operator's admission rules.
3. Policy: images pinned (no ``latest``, no missing tag), requests and limits
   on every container, Pod Security "restricted" (non-root, no privilege
   escalation, all capabilities dropped, a seccomp profile), probes on every
   server, a preStop hook shorter than the grace period, and references that
   resolve (HPA and PDB to Deployments, Services to pods and named ports,
   volumes to PersistentVolumeClaims).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import jsonschema
import kubernetes_validate
import referencing
import yaml

K8S_DIR: Final = Path(__file__).resolve().parent
SCHEMA_DIR: Final = K8S_DIR / "schemas"

# The Kubernetes version the manifests are validated against. 1.30 is the oldest
# that accepts them (lifecycle.preStop.sleep); 1.32 is what kubectl here renders with.
KUBERNETES_VERSION: Final = "1.32.0"
NAMESPACE: Final = "mnist"

# variant name -> kustomization directory (relative to deploy/k8s)
VARIANTS: Final[dict[str, str]] = {
    "storage": "storage",
    "serving-cpu": "overlays/cpu/serving",
    "serving-gpu": "overlays/gpu/serving",
    "training-cpu": "overlays/cpu/training",
    "training-gpu": "overlays/gpu/training",
    "loadtest": "loadtest",
    "web": "web",
}
GPU_VARIANTS: Final = frozenset({"serving-gpu", "training-gpu"})
GPU_RESOURCE: Final = "nvidia.com/gpu"



@dataclass(frozen=True)
class CustomResource:
    """What the checks need to know about one Training Operator kind."""

    schema_file: str  # in deploy/k8s/schemas/
    replicas_key: str  # spec.<replicas_key> maps replica type -> ReplicaSpec
    container_name: str  # the operator requires a container of this name in every replica
    chief_types: tuple[str, ...]  # at most one replica of these in total


CUSTOM_RESOURCES: Final[dict[tuple[str, str], CustomResource]] = {
    ("kubeflow.org/v1", "PyTorchJob"): CustomResource(
        "pytorchjob-kubeflow-v1.json", "pytorchReplicaSpecs", "pytorch", ("Master",)
    ),
    ("kubeflow.org/v1", "TFJob"): CustomResource(
        "tfjob-kubeflow-v1.json", "tfReplicaSpecs", "tensorflow", ("Chief", "Master")
    ),
}
_K8S_DEFINITIONS_URI: Final = "https://kubernetes.io/api/_definitions.json"
_NAMESPACED_EXEMPT: Final = frozenset({"Namespace"})


class ManifestError(RuntimeError):
    """A variant could not be rendered or parsed."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one rendered object."""

    variant: str
    obj: str  # "Kind/name"
    message: str

    def __str__(self) -> str:
        return f"{self.variant}: {self.obj}: {self.message}"


@dataclass(frozen=True)
class PodTemplate:
    """A pod template found inside a workload, with where it was found."""

    owner: str  # "Kind/name" or "Kind/name[Replica]"
    kind: str
    spec: dict[str, Any]
    labels: dict[str, str]


# ---------------------------------------------------------------- rendering


KUBECTL_MISSING = (
    "kubectl not found on PATH: it renders the kustomizations (kubectl kustomize). "
    "Install kubectl >= 1.27 (for example from the Kubernetes apt repository) and retry."
)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise ManifestError(KUBECTL_MISSING)
    return path


def render(variant: str) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k deploy/k8s/<variant dir>`` would send, in order."""
    if variant not in VARIANTS:
        raise ManifestError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return render_dir(K8S_DIR / VARIANTS[variant])


def render_dir(directory: Path) -> list[dict[str, Any]]:
    """Render any kustomization directory with ``kubectl kustomize``."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize {directory} failed (exit {result.returncode}):\n{result.stderr}")
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    if not objects:
        raise ManifestError(f"kubectl kustomize {directory} rendered no objects")
    for doc in objects:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise ManifestError(f"{directory}: rendered a document without apiVersion/kind: {str(doc)[:200]}")
    return objects


def render_all(variants: Iterable[str] = VARIANTS) -> dict[str, list[dict[str, Any]]]:
    return {variant: render(variant) for variant in variants}


def ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj.get('metadata', {}).get('name', '?')}"


# ---------------------------------------------------------------- schemas


@lru_cache(maxsize=4)
def _k8s_definitions(version: str) -> dict[str, Any]:
    package_dir = Path(kubernetes_validate.__file__).resolve().parent
    path = package_dir / "kubernetes-json-schema" / f"v{version}-local-strict" / "_definitions.json"
    if not path.is_file():
        raise ManifestError(
            f"kubernetes-validate has no strict schemas for Kubernetes {version} at {path}; "
            "choose a version it ships (see kubernetes-validate --help)"
        )
    return json.loads(path.read_text())


@lru_cache(maxsize=8)
def _crd_validator(schema_file: str, version: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / schema_file).read_text())
    definitions = referencing.Resource.from_contents(_k8s_definitions(version))
    registry = referencing.Registry().with_resource(_K8S_DEFINITIONS_URI, definitions)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_problems(
    variant: str, objects: Sequence[dict[str, Any]], version: str = KUBERNETES_VERSION
) -> list[Problem]:
    """Validate every object: built-in kinds strictly, custom resources against the carried CRD schemas."""
    problems = []
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_RESOURCES:
            custom = CUSTOM_RESOURCES[key]
            validator = _crd_validator(custom.schema_file, version)
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
                where = "/".join(str(part) for part in error.absolute_path) or "(root)"
                problems.append(Problem(variant, ref(obj), f"schema: {where}: {error.message}"))
            problems.extend(Problem(variant, ref(obj), message) for message in _operator_rules(obj, custom))
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                Problem(variant, ref(obj), f"no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}")
            )
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(part) for part in error.path) or "(root)"
            problems.append(Problem(variant, ref(obj), f"schema: {where}: {error.message}"))
    return problems


def _operator_rules(obj: dict[str, Any], custom: CustomResource) -> Iterator[str]:
    """The Training Operator's admission webhook rules (v1.8), which a schema cannot express."""
    container_name = custom.container_name
    specs = obj.get("spec", {}).get(custom.replicas_key) or {}
    chiefs = 0
    for replica_type, spec in specs.items():
        containers = (spec or {}).get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            yield f"{replica_type}: no containers; the operator expects at least one"
        if container_name not in [c.get("name") for c in containers]:
            yield f"{replica_type}: no container named {container_name!r}; the operator requires one"
        if replica_type in custom.chief_types:
            chiefs += int((spec or {}).get("replicas", 1))
    if chiefs > 1:
        yield f"{chiefs} {'/'.join(custom.chief_types)} replicas; the operator allows exactly one"


# ---------------------------------------------------------------- policy


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {
    None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2Gi", 1) as a number of base units."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity; expected e.g. '500m', '2', '1Gi'")
    return Decimal(match.group(1)) * _SUFFIX[match.group(2)]


def pod_templates(obj: dict[str, Any]) -> list[PodTemplate]:
    """The pod templates a workload creates pods from (none for other kinds)."""
    kind = obj["kind"]
    name = ref(obj)
    spec = obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = spec.get("template", {})
        found = [(name, template)]
    elif kind == "CronJob":
        found = [(name, spec.get("jobTemplate", {}).get("spec", {}).get("template", {}))]
    elif (obj["apiVersion"], kind) in CUSTOM_RESOURCES:
        replicas_key = CUSTOM_RESOURCES[(obj["apiVersion"], kind)].replicas_key
        found = [(f"{name}[{rtype}]", rs.get("template", {})) for rtype, rs in (spec.get(replicas_key) or {}).items()]
    else:
        return []
    return [
        PodTemplate(owner, kind, t.get("spec", {}), t.get("metadata", {}).get("labels", {}) or {}) for owner, t in found
    ]


def _containers(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("container", c) for c in pod.get("containers") or []] + [
        ("initContainer", c) for c in pod.get("initContainers") or []
    ]


def image_problem(image: str) -> str | None:
    """Why an image reference is not pinned, or None when it is (explicit tag other than latest, or digest)."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (means :latest); pin an explicit version tag"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or not tag:
        return f"image {image!r} uses the 'latest' tag; pin an explicit version tag"
    return None


def _effective(pod: dict[str, Any], container: dict[str, Any], field: str) -> Any:
    """A securityContext field, the container's value overriding the pod's."""
    own = (container.get("securityContext") or {}).get(field)
    return own if own is not None else (pod.get("securityContext") or {}).get(field)


def _prestop_sleep_seconds(container: dict[str, Any]) -> int | None:
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = (pre_stop.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return int(command[1])
    return None


def container_problems(template: PodTemplate, gpu: bool) -> Iterator[str]:
    pod = template.spec
    long_running = template.kind in ("Deployment", "StatefulSet", "DaemonSet")
    for role, container in _containers(pod):
        where = f"{role} {container.get('name')!r}"
        problem = image_problem(container.get("image", ""))
        if problem:
            yield f"{where}: {problem}"
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (resources.get(section) or {}):
                    yield f"{where}: resources.{section}.{resource} is not set"
        yield from _quantity_problems(where, resources)
        if _effective(pod, container, "runAsNonRoot") is not True:
            yield f"{where}: runAsNonRoot is not true (pod or container securityContext)"
        if _effective(pod, container, "runAsUser") == 0:
            yield f"{where}: runAsUser is 0 (root)"
        if (container.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
            yield f"{where}: securityContext.allowPrivilegeEscalation is not false"
        if (container.get("securityContext") or {}).get("privileged"):
            yield f"{where}: runs privileged"
        if "ALL" not in ((container.get("securityContext") or {}).get("capabilities") or {}).get("drop", []):
            yield f"{where}: securityContext.capabilities.drop does not include ALL"
        seccomp = (_effective(pod, container, "seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield f"{where}: no RuntimeDefault (or Localhost) seccompProfile"
        if role == "container" and long_running:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in container:
                    yield f"{where}: no {probe}"
            yield from _probe_port_problems(where, container)
            sleep = _prestop_sleep_seconds(container)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if sleep is None:
                yield f"{where}: no preStop sleep; endpoints may still route to a terminating pod"
            elif sleep >= grace:
                yield f"{where}: preStop sleep {sleep}s is not shorter than terminationGracePeriodSeconds {grace}s"
        has_gpu = GPU_RESOURCE in (resources.get("limits") or {})
        if role == "container" and gpu and not has_gpu:
            yield f"{where}: GPU variant but no {GPU_RESOURCE} limit"
        if not gpu and has_gpu:
            yield f"{where}: CPU variant requests {GPU_RESOURCE}"
    if gpu:
        tolerations = [t.get("key") for t in pod.get("tolerations") or []]
        if GPU_RESOURCE not in tolerations:
            yield f"GPU variant without a toleration for the {GPU_RESOURCE} taint"
        if not pod.get("nodeSelector") and not pod.get("affinity"):
            yield "GPU variant without a nodeSelector or affinity for GPU nodes"


def _quantity_problems(where: str, resources: dict[str, Any]) -> Iterator[str]:
    parsed: dict[str, dict[str, Decimal]] = {"requests": {}, "limits": {}}
    for section in parsed:
        for resource, value in (resources.get(section) or {}).items():
            try:
                parsed[section][resource] = parse_quantity(value)
            except ValueError as error:
                yield f"{where}: resources.{section}.{resource}: {error}"
    for resource, request in parsed["requests"].items():
        limit = parsed["limits"].get(resource)
        if limit is not None and request > limit:
            asked, allowed = resources["requests"][resource], resources["limits"][resource]
            yield f"{where}: {resource} request {asked} exceeds its limit {allowed}"


def _probe_port_problems(where: str, container: dict[str, Any]) -> Iterator[str]:
    ports = container.get("ports") or []
    names = {p.get("name") for p in ports if p.get("name")}
    numbers = {p["containerPort"] for p in ports}
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(probe_name) or {}
        for handler in ("httpGet", "tcpSocket", "grpc"):
            port = (probe.get(handler) or {}).get("port")
            if port is None:
                continue
            if (isinstance(port, str) and port not in names) or (isinstance(port, int) and port not in numbers):
                yield f"{where}: {probe_name} uses port {port!r}, which the container does not declare"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("labels") or {}


def _match_labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj["spec"].get("selector") or {}).get("matchLabels") or {}


def policy_problems(variant: str, objects: Sequence[dict[str, Any]], known_claims: set[str]) -> list[Problem]:
    """The policy rules for one rendered variant.

    ``known_claims``: names of the PersistentVolumeClaims that exist across all
    variants (the model repository lives in the storage variant).
    """
    problems: list[Problem] = []
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    templates = [t for o in objects for t in pod_templates(o)]
    hpa_targets: set[str] = set()
    for obj in objects:
        messages: Iterable[str] = ()
        if obj["kind"] == "HorizontalPodAutoscaler":
            messages = _hpa_problems(obj, deployments, hpa_targets)
        elif obj["kind"] == "PodDisruptionBudget":
            matched = [n for n, d in deployments.items() if _selects(_match_labels(obj), _pod_labels(d))]
            if len(matched) != 1:
                messages = [f"selector {_match_labels(obj)} matches Deployments {matched}; expected exactly one"]
        elif obj["kind"] == "Service":
            messages = _service_problems(obj, templates)
        namespace = obj.get("metadata", {}).get("namespace")
        if obj["kind"] not in _NAMESPACED_EXEMPT and namespace != NAMESPACE:
            messages = [*messages, f"namespace is {namespace!r}; expected {NAMESPACE!r}"]
        problems.extend(Problem(variant, ref(obj), m) for m in messages)
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for name, deployment in deployments.items():
        messages = _deployment_problems(deployment, name in hpa_targets, budgets)
        problems.extend(Problem(variant, ref(deployment), m) for m in messages)
    for template in templates:
        messages = [*container_problems(template, variant in GPU_VARIANTS), *_claim_problems(template, known_claims)]
        problems.extend(Problem(variant, template.owner, m) for m in messages)
    return problems


def _hpa_problems(hpa: dict[str, Any], deployments: dict[str, Any], hpa_targets: set[str]) -> Iterator[str]:
    target = hpa["spec"]["scaleTargetRef"]
    if target.get("kind") != "Deployment" or target.get("name") not in deployments:
        yield f"scaleTargetRef {target.get('kind')}/{target.get('name')} is not a Deployment of this variant"
    else:
        hpa_targets.add(target["name"])
    if hpa["spec"].get("minReplicas", 1) < 2:
        yield "minReplicas < 2: one pod cannot roll or be drained without an outage"


def _deployment_problems(deployment: dict[str, Any], autoscaled: bool, budgets: list[dict[str, Any]]) -> Iterator[str]:
    spec = deployment["spec"]
    if not _selects(_match_labels(deployment), _pod_labels(deployment)):
        yield f"selector {_match_labels(deployment)} does not match its own pod template labels"
    if not autoscaled:
        yield "no HorizontalPodAutoscaler scales it"
    elif "replicas" in spec:
        yield "sets spec.replicas although an HPA scales it; kubectl apply would reset the scale"
    if not any(_selects(_match_labels(budget), _pod_labels(deployment)) for budget in budgets):
        yield "no PodDisruptionBudget covers its pods"
    strategy = spec.get("strategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        yield "strategy is not RollingUpdate"
    elif str((strategy.get("rollingUpdate") or {}).get("maxUnavailable", "25%")) not in ("0", "0%"):
        yield "rollingUpdate.maxUnavailable is not 0: a rollout would drop serving capacity"


def _claim_problems(template: PodTemplate, known_claims: set[str]) -> Iterator[str]:
    for volume in template.spec.get("volumes") or []:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is not None and claim not in known_claims:
            yield f"volume {volume['name']!r} uses PersistentVolumeClaim {claim!r}, which no variant defines"


def _service_problems(service: dict[str, Any], templates: list[PodTemplate]) -> Iterator[str]:
    selector = service["spec"].get("selector") or {}
    backends = [t for t in templates if _selects(selector, t.labels)]
    if not backends:
        yield f"selector {selector} matches no pod template of this variant"
        return
    for port in service["spec"].get("ports") or []:
        target = port.get("targetPort", port["port"])
        key = "name" if isinstance(target, str) else "containerPort"
        for template in backends:
            declared = [p.get(key) for c in template.spec.get("containers") or [] for p in c.get("ports") or []]
            if target not in declared:
                yield f"port {port.get('name')!r} targets {target!r}, not declared by {template.owner}"


# ---------------------------------------------------------------- all together


def check(
    rendered: dict[str, list[dict[str, Any]]], version: str = KUBERNETES_VERSION
) -> list[Problem]:
    """Schema and policy problems of already rendered variants (empty when all is well)."""
    claims = {
        o["metadata"]["name"] for objects in rendered.values() for o in objects if o["kind"] == "PersistentVolumeClaim"
    }
    problems: list[Problem] = []
    for variant, objects in rendered.items():
        problems.extend(schema_problems(variant, objects, version))
        problems.extend(policy_problems(variant, objects, claims))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help=f"variants to check (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION, help="schema version to validate against")
    args = parser.parse_args(argv)
    try:
        rendered = render_all(args.variants or VARIANTS)
        if args.variants:
            # Cross-variant references (the models PVC) need the storage variant too.
            rendered.setdefault("storage", render("storage"))
        problems = check(rendered, args.kubernetes_version)
    except ManifestError as error:
        print(f"error: {error}")
        return 2
    for variant, objects in rendered.items():
        count = sum(1 for p in problems if p.variant == variant)
        kinds = ", ".join(sorted({o["kind"] for o in objects}))
        print(f"{variant:<14} {len(objects):>3} objects  {'ok' if not count else f'{count} problem(s)':<14} {kinds}")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

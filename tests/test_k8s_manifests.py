"""The Kubernetes manifests, proven offline: every variant renders, validates, and keeps the policy.

Rendering uses ``kubectl kustomize`` (kubectl's built-in kustomize, what ``kubectl apply -k`` runs);
schemas are Kubernetes' own at a pinned version plus the Training Operator's CRD schema subsets
carried in deploy/k8s/schemas/. The negative tests break one thing in a real rendered manifest and
check that the schema or the policy names it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deploy.k8s import manifest_check as mc

EXPECTED_KINDS = {
    "storage": {"Namespace", "PersistentVolumeClaim"},
    "serving-cpu": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
    "serving-gpu": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
    "training-cpu": {"PyTorchJob", "TFJob"},
    "training-gpu": {"PyTorchJob", "TFJob"},
    "loadtest": {"PersistentVolumeClaim", "Job"},
    "web": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
}


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    return mc.render_all()


@pytest.fixture(scope="module")
def claims(rendered: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {o["metadata"]["name"] for objs in rendered.values() for o in objs if o["kind"] == "PersistentVolumeClaim"}


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def test_variants_cover_every_kustomization_in_the_tree() -> None:
    kustomizations = {
        p.parent.relative_to(mc.K8S_DIR).as_posix()
        for p in mc.K8S_DIR.rglob("kustomization.yaml")
        if "base" not in p.relative_to(mc.K8S_DIR).parts
    }
    assert kustomizations == set(mc.VARIANTS.values())
    assert set(EXPECTED_KINDS) == set(mc.VARIANTS)


@pytest.mark.parametrize("variant", sorted(mc.VARIANTS))
def test_variant_renders_the_expected_kinds(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    assert {o["kind"] for o in rendered[variant]} == EXPECTED_KINDS[variant]


@pytest.mark.parametrize("variant", sorted(mc.VARIANTS))
def test_every_object_validates_against_its_schema(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    problems = mc.schema_problems(variant, rendered[variant])
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize("variant", sorted(mc.VARIANTS))
def test_every_variant_keeps_the_policy(
    rendered: dict[str, list[dict[str, Any]]], claims: set[str], variant: str
) -> None:
    problems = mc.policy_problems(variant, rendered[variant], claims)
    assert not problems, "\n".join(map(str, problems))


def test_cli_checks_all_variants_and_reports_ok(kubectl: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert mc.main([]) == 0
    out = capsys.readouterr().out
    for variant in mc.VARIANTS:
        assert f"{variant} " in out
    assert "problem" not in out


def test_cli_names_an_unknown_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert mc.main(["serving-tpu"]) == 2
    assert "unknown variant 'serving-tpu'" in capsys.readouterr().out


# ------------------------------------------------------------------ schemas catch mistakes


def test_k8s_schema_rejects_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = copy.deepcopy(find(rendered["serving-cpu"], "Deployment", "torch-rest"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    messages = [p.message for p in mc.schema_problems("t", [deployment])]
    assert any("readinesProbe" in m for m in messages), messages


def test_crd_schema_rejects_unknown_fields_and_replica_types(rendered: dict[str, list[dict[str, Any]]]) -> None:
    job = copy.deepcopy(find(rendered["training-cpu"], "PyTorchJob", "mnist-torch-train"))
    specs = job["spec"]["pytorchReplicaSpecs"]
    specs["Chief"] = copy.deepcopy(specs["Worker"])  # a TFJob replica type, not a PyTorchJob one
    specs["Worker"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = ["Always"]
    job["spec"]["runPolicy"]["cleanPodPolicies"] = "All"
    messages = " | ".join(p.message for p in mc.schema_problems("t", [job]))
    assert "'Chief' is not one of ['Master', 'Worker']" in messages
    assert "Worker/template/spec/containers/0/imagePullPolicy" in messages
    assert "'cleanPodPolicies' was unexpected" in messages


def test_operator_rules_require_the_named_container_and_one_chief(rendered: dict[str, list[dict[str, Any]]]) -> None:
    job = copy.deepcopy(find(rendered["training-cpu"], "TFJob", "mnist-tf-train"))
    job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    job["spec"]["tfReplicaSpecs"]["Chief"]["replicas"] = 2
    messages = [p.message for p in mc.schema_problems("t", [job])]
    assert "Worker: no container named 'tensorflow'; the operator requires one" in messages
    assert "2 Chief/Master replicas; the operator allows exactly one" in messages


# ------------------------------------------------------------------ policy catches mistakes


def _torch_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment", "torch-rest")["spec"]["template"]["spec"]["containers"][0]


def _break_latest_tag(objs: list[dict[str, Any]]) -> None:
    _torch_container(objs)["image"] = "registry.example.com:5000/mnist-torch-server:latest"


def _break_untagged_image(objs: list[dict[str, Any]]) -> None:
    _torch_container(objs)["image"] = "registry.example.com:5000/mnist-torch-server"


def _break_missing_limit(objs: list[dict[str, Any]]) -> None:
    del _torch_container(objs)["resources"]["limits"]["memory"]


def _break_request_over_limit(objs: list[dict[str, Any]]) -> None:
    _torch_container(objs)["resources"]["requests"]["cpu"] = "2500m"


def _break_bad_quantity(objs: list[dict[str, Any]]) -> None:
    _torch_container(objs)["resources"]["limits"]["memory"] = "2 GB"


def _break_root(objs: list[dict[str, Any]]) -> None:
    del find(objs, "Deployment", "torch-rest")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def _break_capabilities(objs: list[dict[str, Any]]) -> None:
    _torch_container(objs)["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}


def _break_seccomp(objs: list[dict[str, Any]]) -> None:
    del find(objs, "Deployment", "torch-rest")["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]


def _break_probe(objs: list[dict[str, Any]]) -> None:
    del _torch_container(objs)["readinessProbe"]


def _break_probe_port(objs: list[dict[str, Any]]) -> None:
    _torch_container(objs)["livenessProbe"]["httpGet"]["port"] = "metrics"


def _break_grace(objs: list[dict[str, Any]]) -> None:
    find(objs, "Deployment", "torch-rest")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 10


def _break_hpa_target(objs: list[dict[str, Any]]) -> None:
    find(objs, "HorizontalPodAutoscaler", "torch-rest")["spec"]["scaleTargetRef"]["name"] = "torch-server"


def _break_replicas_under_hpa(objs: list[dict[str, Any]]) -> None:
    find(objs, "Deployment", "tfserving")["spec"]["replicas"] = 3


def _break_pdb_selector(objs: list[dict[str, Any]]) -> None:
    find(objs, "PodDisruptionBudget", "tfserving")["spec"]["selector"]["matchLabels"] = {"app": "tfserving"}


def _break_service_port(objs: list[dict[str, Any]]) -> None:
    find(objs, "Service", "tfserving-headless")["spec"]["ports"][0]["targetPort"] = "grcp"


def _break_claim(objs: list[dict[str, Any]]) -> None:
    volumes = find(objs, "Deployment", "tfserving")["spec"]["template"]["spec"]["volumes"]
    next(v for v in volumes if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"] = "models"


def _break_max_unavailable(objs: list[dict[str, Any]]) -> None:
    find(objs, "Deployment", "tfserving")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = 1


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_break_latest_tag, "uses the 'latest' tag"),
        (_break_untagged_image, "has no tag (means :latest)"),
        (_break_missing_limit, "resources.limits.memory is not set"),
        (_break_request_over_limit, "cpu request 2500m exceeds its limit 2"),
        (_break_bad_quantity, "'2 GB' is not a Kubernetes quantity"),
        (_break_root, "runAsNonRoot is not true"),
        (_break_capabilities, "capabilities.drop does not include ALL"),
        (_break_seccomp, "no RuntimeDefault (or Localhost) seccompProfile"),
        (_break_probe, "no readinessProbe"),
        (_break_probe_port, "livenessProbe uses port 'metrics', which the container does not declare"),
        (_break_grace, "preStop sleep 10s is not shorter than terminationGracePeriodSeconds 10s"),
        (_break_hpa_target, "scaleTargetRef Deployment/torch-server is not a Deployment of this variant"),
        (_break_replicas_under_hpa, "sets spec.replicas although an HPA scales it"),
        (_break_pdb_selector, "matches Deployments []; expected exactly one"),
        (_break_service_port, "targets 'grcp', not declared"),
        (_break_claim, "PersistentVolumeClaim 'models', which no variant defines"),
        (_break_max_unavailable, "maxUnavailable is not 0"),
    ],
)
def test_policy_names_each_violation(
    rendered: dict[str, list[dict[str, Any]]], claims: set[str], breakage: Any, expected: str
) -> None:
    objects = copy.deepcopy(rendered["serving-cpu"])
    breakage(objects)
    messages = [str(p) for p in mc.policy_problems("serving-cpu", objects, claims)]
    assert any(expected in m for m in messages), messages


def test_policy_requires_gpus_in_gpu_variants_and_forbids_them_on_cpu(
    rendered: dict[str, list[dict[str, Any]]], claims: set[str]
) -> None:
    gpu_as_cpu = [str(p) for p in mc.policy_problems("serving-cpu", rendered["serving-gpu"], claims)]
    assert any("CPU variant requests nvidia.com/gpu" in m for m in gpu_as_cpu), gpu_as_cpu
    cpu_as_gpu = [str(p) for p in mc.policy_problems("training-gpu", rendered["training-cpu"], claims)]
    assert any("GPU variant but no nvidia.com/gpu limit" in m for m in cpu_as_gpu), cpu_as_gpu
    assert any("without a toleration for the nvidia.com/gpu taint" in m for m in cpu_as_gpu), cpu_as_gpu


@pytest.mark.parametrize(
    ("value", "expected"),
    [("500m", "0.5"), ("2", "2"), (1, "1"), ("1Gi", str(2**30)), ("256Mi", str(256 * 2**20)), ("1.5G", "1.5E+9")],
)
def test_parse_quantity(value: str | int, expected: str) -> None:
    assert mc.parse_quantity(value) == mc.Decimal(expected)


@pytest.mark.parametrize("image", ["repo/app:1.2.3", "localhost:5000/app:0.1.0-gpu", "app@sha256:" + "a" * 64])
def test_pinned_images_pass(image: str) -> None:
    assert mc.image_problem(image) is None


def test_namespace_enforces_the_restricted_pod_security_profile(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The API server itself then refuses any pod that slips past the policy above."""
    namespace = find(rendered["storage"], "Namespace", mc.NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

"""The rendered manifests agree with the code they run.

Every command line in a manifest is parsed by the real parser of the program it starts (torchrun,
both trainers, gunicorn's config file, the server's settings), every path and port is checked
against the model contract, and the draining arithmetic (preStop, grace period, gunicorn's
graceful timeout, TF Serving's connection age) is checked against the values the servers use.
"""

from __future__ import annotations

import re
import runpy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from deploy.k8s import manifest_check as mc
from mnist_client import contract

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_MOUNT = "/models"
OPERATOR_ENV = {"MASTER_ADDR": "mnist-torch-train-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"}
OUR_IMAGES = (
    "mnist-torch-server", "mnist-tfserving", "mnist-torch-train", "mnist-tf-train", "mnist-loadtest", "mnist-web",
)  # fmt: skip


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    return mc.render_all()


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return find(objects, "Deployment", name)["spec"]["template"]["spec"]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e}


def mount_of(c: dict[str, Any], pod: dict[str, Any], claim: str) -> dict[str, Any]:
    volume = next(v["name"] for v in pod["volumes"] if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim)
    return next(m for m in c["volumeMounts"] if m["name"] == volume)


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args; fails on a variable nobody sets."""

    def value(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"{arg!r} uses $({match.group(1)}), which neither the pod nor the operator sets"
        return env[match.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg)


# ------------------------------------------------------------------ the PyTorch REST server


@pytest.mark.parametrize("variant", ["serving-cpu", "serving-gpu"])
def test_rest_server_settings_parse_and_match_the_contract(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    from serving.torch_server.config import ServerConfig

    pod = pod_spec(rendered[variant], "torch-rest")
    server = container(pod, "server")
    config = ServerConfig.load(environ=env_of(server))
    mount = mount_of(server, pod, "mnist-models")
    assert mount["mountPath"] == MODELS_MOUNT and mount["readOnly"] is True
    assert config.model_base_path == Path(MODELS_MOUNT, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    assert config.device == ("cuda" if variant == "serving-gpu" else "cpu")
    assert [p["containerPort"] for p in server["ports"]] == [contract.REST_PORT]


def test_gunicorn_settings_fit_the_pod_and_the_grace_period(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pod = pod_spec(rendered["serving-cpu"], "torch-rest")
    server = container(pod, "server")
    for name, value in env_of(server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # else the config file makes a temp folder
    gunicorn = runpy.run_path(str(REPO_ROOT / "serving" / "torch_server" / "gunicorn_conf.py"))

    # The image's command puts nginx on the container port and gunicorn on loopback behind it.
    from serving.torch_server.front import DEFAULT_UPSTREAM_PORT, proxy_settings

    assert gunicorn["bind"] == [f"0.0.0.0:{server['ports'][0]['containerPort']}"]  # what the front remaps
    front = proxy_settings(DEFAULT_UPSTREAM_PORT)
    assert (front.host, front.port) == ("0.0.0.0", server["ports"][0]["containerPort"])
    assert front.upstream == f"127.0.0.1:{DEFAULT_UPSTREAM_PORT}"
    # Workers follow the pod's CPU limit, not the node's core count gunicorn would see.
    assert gunicorn["workers"] == int(mc.parse_quantity(server["resources"]["limits"]["cpu"]))
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + gunicorn["graceful_timeout"], (
        f"grace {grace}s < preStop {pre_stop}s + gunicorn graceful_timeout {gunicorn['graceful_timeout']}s: "
        "the kubelet would kill requests still in flight"
    )


def test_rest_probes_answer_as_the_pod_needs_before_a_model_exists(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Liveness passes and readiness fails while the models volume is still empty (fresh cluster)."""
    from serving.torch_server.app import create_app

    server = container(pod_spec(rendered["serving-cpu"], "torch-rest"), "server")
    settings = {"model_base_path": tmp_path / "torch" / "mnist", "device": env_of(server)["MNIST_REST_DEVICE"]}
    app = create_app(settings)
    try:
        client = app.test_client()
        assert client.get(server["startupProbe"]["httpGet"]["path"]).status_code == 200
        assert client.get(server["livenessProbe"]["httpGet"]["path"]).status_code == 200
        assert client.get(server["readinessProbe"]["httpGet"]["path"]).status_code == 503
    finally:
        app.extensions["mnist"].store.stop_watching()


# ------------------------------------------------------------------ TensorFlow Serving


def _flags(args: list[str]) -> dict[str, str]:
    flags = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"TF Serving flag {arg!r}: expected --name=value"
        name, _, value = arg[2:].partition("=")
        flags[name] = value
    return flags


@pytest.mark.parametrize("variant", ["serving-cpu", "serving-gpu"])
def test_tfserving_flags_match_the_contract_and_our_config(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    pod = pod_spec(rendered[variant], "tfserving")
    server = container(pod, "tfserving")
    flags = _flags(server["args"])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert int(flags["port"]) == ports["grpc"] == contract.TFS_GRPC_PORT
    assert int(flags["rest_api_port"]) == ports["http"] == contract.TFS_REST_PORT
    # The config files the flags name are ours, copied into the image's /etc/tfserving by Dockerfile.tf.
    config_dir = REPO_ROOT / "serving" / "tfserving"
    dockerfile = (REPO_ROOT / "Dockerfile.tf").read_text()
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        path = Path(flags[flag])
        assert path.parent == Path("/etc/tfserving") and (config_dir / path.name).is_file(), flag
        copy_line = rf"COPY [^\n]*serving/tfserving/{re.escape(path.name)}[^\n]* /etc/tfserving/"
        assert re.search(copy_line, dockerfile), f"Dockerfile.tf does not copy {path.name} to /etc/tfserving"
    models_config = (config_dir / "models.config").read_text()
    base_path = f"{MODELS_MOUNT}/{contract.TF_FRAMEWORK_DIR}/{contract.MODEL_NAME}"
    assert re.search(rf'base_path:\s*"{re.escape(base_path)}"', models_config), models_config
    assert re.search(rf'name:\s*"{contract.MODEL_NAME}"', models_config)
    mount = mount_of(server, pod, "mnist-models")
    assert mount["mountPath"] == MODELS_MOUNT and mount["readOnly"] is True
    # Prometheus scrapes the path monitoring.config serves the metrics on, on the REST port.
    annotations = find(rendered[variant], "Deployment", "tfserving")["spec"]["template"]["metadata"]["annotations"]
    metrics_path = re.search(r'path:\s*"([^"]+)"', (config_dir / "monitoring.config").read_text())
    assert metrics_path and annotations["prometheus.io/path"] == metrics_path.group(1)
    assert int(annotations["prometheus.io/port"]) == contract.TFS_REST_PORT
    # TensorFlow's thread pools and the batch threads follow the CPU limit; each device has its batching file.
    cpus = int(mc.parse_quantity(server["resources"]["limits"]["cpu"]))
    assert int(flags["tensorflow_intra_op_parallelism"]) == int(flags["tensorflow_inter_op_parallelism"]) == cpus
    batching_file = "batching_parameters.txt" if variant == "serving-gpu" else "batching_parameters_cpu.txt"
    assert Path(flags["batching_parameters_file"]).name == batching_file
    batch_threads = re.search(r"num_batch_threads\s*\{\s*value:\s*(\d+)", (config_dir / batching_file).read_text())
    assert batch_threads and int(batch_threads.group(1)) == cpus


def test_cpu_and_gpu_tfserving_differ_only_in_device_tuning(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cpu, gpu = (
        _flags(container(pod_spec(rendered[v], "tfserving"), "tfserving")["args"]) for v in ("serving-cpu", "serving-gpu")
    )
    tuning = {"batching_parameters_file", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"}
    assert cpu.keys() == gpu.keys()
    assert {k: v for k, v in cpu.items() if k not in tuning} == {k: v for k, v in gpu.items() if k not in tuning}


def test_tfserving_command_line_is_tensorflow_model_servers(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The stand-in parses tensorflow_model_server's flags (names, syntax, values) and refuses unknown ones."""
    from serving.tfs_standin.flags import parse_flags

    server = container(pod_spec(rendered["serving-cpu"], "tfserving"), "tfserving")
    entrypoint = (REPO_ROOT / "docker" / "tfserving-entrypoint.sh").read_text()
    assert server["command"] == ["tensorflow_model_server"] and "exec tensorflow_model_server" in entrypoint
    # The stand-in has no monitoring endpoint: leave that flag out. /etc/tfserving in the image holds
    # serving/tfserving/ (Dockerfile.tf).
    config_dir = str(REPO_ROOT / "serving" / "tfserving") + "/"
    args = [a.replace("/etc/tfserving/", config_dir) for a in server["args"]]
    options = parse_flags([a for a in args if not a.startswith("--monitoring_config_file=")])
    assert (options.port, options.rest_api_port) == (contract.TFS_GRPC_PORT, contract.TFS_REST_PORT)
    assert options.enable_batching and options.file_system_poll_wait_seconds > 0
    assert "grpc.max_connection_age_ms" in options.grpc_channel_arguments


def test_tfserving_drains_clients_before_sigterm(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = pod_spec(rendered["serving-cpu"], "tfserving")
    server = container(pod, "tfserving")
    channel_args = dict(
        item.split("=", 1) for item in _flags(server["args"])["grpc_channel_arguments"].split(",")
    )
    age_s = int(channel_args["grpc.max_connection_age_ms"]) / 1000
    age_grace_s = int(channel_args["grpc.max_connection_age_grace_ms"]) / 1000
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= age_s + age_grace_s, "clients must be aged off the pod before TF Serving gets SIGTERM"
    assert pod["terminationGracePeriodSeconds"] > pre_stop
    assert server["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{contract.MODEL_NAME}"
    assert server["startupProbe"]["httpGet"]["path"] == f"/v1/models/{contract.MODEL_NAME}"


def test_headless_service_lists_every_tfserving_pod_for_round_robin(
    rendered: dict[str, list[dict[str, Any]]]
) -> None:
    headless = find(rendered["serving-cpu"], "Service", "tfserving-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False), "DNS must list ready pods only"
    assert [p["port"] for p in headless["spec"]["ports"]] == [contract.TFS_GRPC_PORT]
    target = f"dns:///tfserving-headless.{mc.NAMESPACE}.svc.cluster.local:{contract.TFS_GRPC_PORT}"
    loadtest = find(rendered["loadtest"], "Job", "mnist-loadtest")
    args = loadtest["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(arg.endswith("=" + target) for arg in args), args
    assert target in (REPO_ROOT / "docs" / "kubernetes.md").read_text()


# ------------------------------------------------------------------ training


def _torchrun_command(job: dict[str, Any], replica: str) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    pod = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
    trainer = container(pod, "pytorch")
    env = {**OPERATOR_ENV, **env_of(trainer)}
    return [expand(a, env) for a in trainer["command"] + trainer["args"]], trainer, pod


@pytest.mark.parametrize("variant", ["training-cpu", "training-gpu"])
def test_pytorchjob_runs_torchrun_with_the_operators_rendezvous(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    from torch.distributed.run import get_args_parser

    from training import train_torch

    job = find(rendered[variant], "PyTorchJob", "mnist-torch-train")
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    for replica in ("Master", "Worker"):
        command, trainer, pod = _torchrun_command(job, replica)
        assert command[0] == "torchrun"
        launch = get_args_parser().parse_args(command[1:])
        assert launch.module and launch.training_script == "training.train_torch"
        assert (launch.nnodes, launch.node_rank) == (OPERATOR_ENV["WORLD_SIZE"], int(OPERATOR_ENV["RANK"]))
        assert launch.master_addr == OPERATOR_ENV["MASTER_ADDR"]
        assert launch.master_port == int(OPERATOR_ENV["MASTER_PORT"])
        # One process per pod, so the operator's WORLD_SIZE (pods x nprocPerNode) is the node count.
        assert launch.nproc_per_node == job["spec"]["nprocPerNode"] == "1"
        args = train_torch.build_parser().parse_args(launch.training_script_args)
        assert str(args.output_dir) == mount_of(trainer, pod, "mnist-models")["mountPath"] == MODELS_MOUNT
        assert not args.skip_if_exists and not args.quick
    port = container(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"], "pytorch")["ports"][0]
    assert port == {"name": "pytorchjob-port", "containerPort": int(OPERATOR_ENV["MASTER_PORT"])}


@pytest.mark.parametrize("variant", ["training-cpu", "training-gpu"])
def test_tfjob_runs_the_tf_trainer_under_tf_config(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    from training import train_tf

    job = find(rendered[variant], "TFJob", "mnist-tf-train")
    assert set(job["spec"]["tfReplicaSpecs"]) == {"Chief", "Worker"}
    for spec in job["spec"]["tfReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        trainer = container(pod, "tensorflow")
        assert trainer["command"] == ["python", "-m", "training.train_tf"]
        args = train_tf.parse_args(trainer["args"])
        assert str(args.output_dir) == mount_of(trainer, pod, "mnist-models")["mountPath"] == MODELS_MOUNT
        assert not args.skip_if_exists and not args.quick
        assert {"name": "tfjob-port", "containerPort": 2222} in trainer["ports"]


# ------------------------------------------------------------------ load test


def test_loadtest_pods_parse_and_target_three_named_targets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from mnist_client.loadtest import cli

    pod = find(rendered["loadtest"], "Job", "mnist-loadtest")["spec"]["template"]["spec"]
    tester = container(pod, "loadtest")
    assert tester["command"] == ["mnist-loadtest"]
    args = cli.build_parser().parse_args([expand(a, {"JOB_COMPLETION_INDEX": "3"}) for a in tester["args"]])
    config = cli.config_from_args(args)
    # PyTorch REST, TF Serving REST (the framework difference) and TF Serving gRPC (the protocol difference).
    assert [(t.name, t.protocol, t.address) for t in config.targets] == [
        ("torch-rest", "rest", f"http://torch-rest.{mc.NAMESPACE}.svc.cluster.local:{contract.REST_PORT}"),
        ("tf-serving-rest", "rest", f"http://tfserving.{mc.NAMESPACE}.svc.cluster.local:{contract.TFS_REST_PORT}"),
        ("tf-serving-grpc", "grpc", f"dns:///tfserving-headless.{mc.NAMESPACE}.svc.cluster.local:{contract.TFS_GRPC_PORT}"),
    ]
    assert config.repeats >= 3, "each point in interleaved rounds, for a median and a spread"
    assert str(args.json) == "/results/parts/result-3.json" and config.labels == {"pod": "3"}
    index_env = next(e for e in tester["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    index_field = index_env["valueFrom"]["fieldRef"]["fieldPath"]
    assert index_field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # The MNIST test images the init container downloads are where the load tester reads them.
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch-mnist")
    assert env_of(tester)["MNIST_DATA_DIR"] == env_of(fetch)["MNIST_CACHE_DIR"] + "/mnist"


def test_merge_waits_for_every_pod_and_reads_their_folder(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from mnist_client.loadtest import cli

    job = find(rendered["loadtest"], "Job", "mnist-loadtest")
    merge = find(rendered["loadtest"], "Job", "mnist-loadtest-merge")["spec"]["template"]["spec"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == job["spec"]["completions"]
    wait = container({"containers": merge["initContainers"]}, "wait-for-results")
    assert env_of(wait)["EXPECTED_RESULTS"] == str(job["spec"]["completions"])
    assert "/results/parts/*.json" in wait["command"][-1]
    merger = container(merge, "merge")
    args = cli.build_parser().parse_args(merger["args"])
    assert args.command == "merge" and args.inputs == ["/results/parts"]
    assert str(args.json) == "/results/merged.json"


# ------------------------------------------------------------------ the web page


def test_web_page_asks_the_three_services_and_reads_the_merged_report(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from serving.web.config import WebConfig

    objects = [*rendered["serving-cpu"], *rendered["loadtest"], *rendered["web"]]
    pod = pod_spec(rendered["web"], "web")
    web = container(pod, "web")
    config = WebConfig.load(environ=env_of(web))  # the page's own settings parser
    assert [(t.name, t.framework, t.protocol, t.address) for t in config.targets()] == [
        ("torch-rest", "pytorch", "rest", f"http://torch-rest.{mc.NAMESPACE}.svc.cluster.local:{contract.REST_PORT}"),
        ("tf-serving-rest", "tensorflow", "rest",
         f"http://tfserving.{mc.NAMESPACE}.svc.cluster.local:{contract.TFS_REST_PORT}"),
        ("tf-serving-grpc", "tensorflow", "grpc", f"tfserving.{mc.NAMESPACE}.svc.cluster.local:{contract.TFS_GRPC_PORT}"),
    ]  # fmt: skip
    # Each address names a Service of the serving stack on a port it serves.
    for target in config.targets():
        host, port = target.address.split("://")[-1].rsplit(":", 1)
        service = find(objects, "Service", host.split(".")[0])
        assert int(port) in [p["port"] for p in service["spec"]["ports"]], target
    assert config.port == contract.WEB_PORT
    assert [p["containerPort"] for p in web["ports"]] == [contract.WEB_PORT]
    assert find(rendered["web"], "Service", "web")["spec"]["ports"][0]["port"] == contract.WEB_PORT
    # The report view reads the folder the merge Job writes merged.json into; read-only.
    merger = container(find(rendered["loadtest"], "Job", "mnist-loadtest-merge")["spec"]["template"]["spec"], "merge")
    merged_json = next(a for a in merger["args"] if a.startswith("--json=")).partition("=")[2]
    mount = mount_of(web, pod, "mnist-loadtest-results")
    assert Path(merged_json).parent == config.reports_dir == Path(mount["mountPath"]) and mount["readOnly"] is True
    # The MNIST test files the init container fetches are where the page reads them.
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch-mnist")
    assert str(config.data_dir) == env_of(fetch)["MNIST_CACHE_DIR"] + "/mnist"
    assert fetch["image"] == web["image"], "the page's own image carries the MNIST loader"


# ------------------------------------------------------------------ images


def test_our_images_carry_the_project_version(rendered: dict[str, list[dict[str, Any]]]) -> None:
    version = tomllib.loads((REPO_ROOT / "clients" / "pyproject.toml").read_text())["project"]["version"]
    seen = set()
    for variant, objects in rendered.items():
        for obj in objects:
            for template in mc.pod_templates(obj):
                for c in template.spec.get("containers", []) + template.spec.get("initContainers", []):
                    name, _, tag = c["image"].rpartition(":")
                    assert name in OUR_IMAGES, f"{variant}: unexpected image {c['image']}"
                    expected = f"{version}-gpu" if variant.endswith("-gpu") else version
                    assert tag == expected, f"{variant}: {c['image']} is not tagged {expected}"
                    seen.add(name)
    assert seen == set(OUR_IMAGES)

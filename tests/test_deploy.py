"""The Kubernetes manifests and image of deploy/, checked offline against what `aigis serve` runs.

The Deployment must run NVIDIA's tritonserver with exactly the flags aigis.serving.server.triton_flags gives
(ports, control header, restricted protocols: one place for each), its ports, probes, Service, autoscaler and
disruption budget must agree with them, and the image and repository must be parameters. The last test asks the
real tritonserver the two questions the cluster will: the kubelet's gRPC health check, and the metric the
autoscaler reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from aigis import contract
from aigis.serving.server import GRPC_PORT, METRICS_PORT, TritonServer, triton_flags

yaml = pytest.importorskip("yaml", reason="the manifests are parsed with pyyaml: pip install pyyaml (test extra)")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE, EXAMPLE = DEPLOY / "base", DEPLOY / "example"
# What the pods load at start: the two ensembles (their steps come with them), as `aigis serve` does for a
# repository without mem_protect; a missing --load-model would stop tritonserver, so mem_protect is an overlay.
MODELS = [contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL]


def kustomization(folder: Path = BASE) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def manifests() -> dict[str, dict]:
    """kind -> the one object of that kind among the kustomization's resources."""
    found = {}
    for name in kustomization()["resources"]:
        for document in yaml.safe_load_all((BASE / name).read_text()):
            object_name = document["metadata"]["name"]
            key = document["kind"] if object_name == "aigis-triton" else f"{document['kind']}/{object_name}"
            assert key not in found, f"two {key} objects"
            found[key] = document
    return found


def container() -> dict:
    (only,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def pod_labels() -> dict:
    return manifests()["Deployment"]["spec"]["template"]["metadata"]["labels"]


def flag(args: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")]
    return value


def test_every_manifest_parses_and_the_kustomization_lists_each_one():
    listed = set(kustomization()["resources"])
    on_disk = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for kind, document in manifests().items():
        assert document["apiVersion"] and document["metadata"]["name"].startswith("aigis-triton"), kind
    assert set(manifests()) == {"ServiceAccount", "Deployment", "Service", "Service/aigis-triton-pods",
                                "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_the_deployment_runs_tritonserver_with_the_flags_aigis_serve_uses():
    args = container()["args"]
    assert args[0] == "tritonserver" and "command" not in container()   # through NVIDIA's entrypoint
    exit_timeout = int(flag(args, "--exit-timeout-secs"))
    assert args[1:] == triton_flags("$(AIGIS_MODEL_REPOSITORY)", host="0.0.0.0", grpc_port=GRPC_PORT,
                                    metrics_port=METRICS_PORT, control_key="$(AIGIS_CONTROL_KEY)", models=MODELS,
                                    exit_timeout_s=exit_timeout)
    env = {item["name"]: item for item in container()["env"]}
    for name in re.findall(r"\$\((\w+)\)", " ".join(args)):    # kubelet leaves an undefined $(VAR) as it is
        assert name in env, f"$({name}) is not defined in the container's env"
    key = env["AIGIS_CONTROL_KEY"]["valueFrom"]["secretKeyRef"]
    assert key["name"] == "aigis-control-key" and not key.get("optional")    # no key, no pod
    assert env["AIGIS_MODEL_REPOSITORY"]["valueFrom"]["configMapKeyRef"]["name"] == "aigis-serving"
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    pause = int(container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pause + exit_timeout     # requests in flight get answered


def test_ports_probes_and_the_service_agree_with_the_flags():
    args = container()["args"]
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}              # HTTP is off, as with aigis serve
    assert "--allow-http=false" in args
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container()[probe]["grpc"] == {"port": GRPC_PORT}, probe
    assert "--strict-readiness=false" in args      # one failed model load must not fail the liveness probe
    service = manifests()["Service"]["spec"]
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["ports"]} == {
        ("grpc", GRPC_PORT, "grpc"), ("metrics", METRICS_PORT, "metrics")}
    assert service["type"] == "ClusterIP"
    template = manifests()["Deployment"]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    pods = manifests()["Service/aigis-triton-pods"]["spec"]   # headless: every pod's address, for fleet clients
    assert pods["clusterIP"] == "None" and [(p["name"], p["port"]) for p in pods["ports"]] == [("grpc", GRPC_PORT)]
    for selector in (service["selector"], pods["selector"],
                     manifests()["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     manifests()["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels().items()


def test_gpus_scaling_and_disruptions():
    resources = container()["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert "replicas" not in manifests()["Deployment"]["spec"]           # the autoscaler owns the count
    hpa = manifests()["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "aigis-triton"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert manifests()["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    (rule,) = yaml.safe_load((DEPLOY / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods_metrics == [rule["name"]["as"]]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]      # a Triton metric: see the last test


def test_the_image_and_the_repository_are_parameters():
    """The base names the image by a placeholder and generates the repository's ConfigMap; the example overlay
    sets both, and rendering it (kubectl's built-in kustomize) puts its values where the pods read them."""
    assert container()["image"] == "aigis-triton"
    assert "s3://" not in (BASE / "deployment.yaml").read_text()
    (generated,) = kustomization()["configMapGenerator"]
    assert generated["name"] == "aigis-serving"
    (image,) = kustomization(EXAMPLE)["images"]
    (replaced,) = kustomization(EXAMPLE)["configMapGenerator"]
    assert image["name"] == "aigis-triton" and (replaced["name"], replaced["behavior"]) == ("aigis-serving", "replace")
    settings = dict(item.split("=", 1) for item in replaced["literals"])
    placeholders = dict(item.split("=", 1) for item in generated["literals"])
    assert settings["AIGIS_MODEL_REPOSITORY"].startswith("s3://")
    assert settings.keys() == placeholders.keys() == {"AIGIS_MODEL_REPOSITORY", "AWS_DEFAULT_REGION"}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed: the example overlay was not rendered")
    rendered = subprocess.run([kubectl, "kustomize", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered.stdout)}
    (deployed,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert deployed["image"] == f"{image['newName']}:{image['newTag']}"
    config = objects["ConfigMap"]
    assert config["data"] == settings
    reference = {e["name"]: e for e in deployed["env"]}["AIGIS_MODEL_REPOSITORY"]["valueFrom"]["configMapKeyRef"]
    assert reference["name"] == config["metadata"]["name"] != "aigis-serving"   # hashed: a change rolls the pods


def test_the_image_installs_what_the_python_steps_import():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\S+-py3$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", dockerfile, re.M)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extra = re.search(r"^ARG AIGIS_EXTRAS=(\S*)$", dockerfile, re.M).group(1)
    needed = {name.split("=")[0].split(">")[0] for name in extras[extra]}
    assert {"torch", "safetensors"} <= needed                  # what mem_protect's model imports
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for folder in set(package_dirs.values()):
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.M), folder
        assert f"!{folder}/" in ignore, folder


PROBE_MODEL = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
'''


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_triton_answers_the_kubelet_probe_without_the_key_and_exports_the_scaling_metric(tmp_path):
    pytest.importorskip("pytriton", reason="the local tritonserver comes from nvidia-pytriton (the serve extra)")
    import grpc

    model = tmp_path / "repo" / "probe"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(PROBE_MODEL)
    (model / "config.pbtxt").write_text('name: "probe"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [{ name: "X", data_type: TYPE_FP32, dims: [1] }]\n'
                                        'output [{ name: "Y", data_type: TYPE_FP32, dims: [1] }]\n')
    with TritonServer(tmp_path / "repo", models=["probe"]) as server, grpc.insecure_channel(server.grpc_url) as channel:
        # grpc.health.v1.Health/Check with service "" (what the kubelet sends): answer status 1, SERVING.
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda raw: raw,
                                    response_deserializer=lambda raw: raw)
        assert check(b"", timeout=10) == b"\x08\x01"
        page = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert re.search(r'^nv_inference_queue_duration_us\{model="probe",version="1"\} ', page, re.M)

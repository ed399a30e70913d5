"""Offline checks of deploy/: the Kubernetes manifests users apply and the images they build.

No cluster, no kustomize binary and no docker engine: the overlays are rendered by
deploy/render.py, core kinds are validated with kubernetes-validate's bundled schemas, the
RayService against KubeRay's CRD schema (shared/k8s-crds), the Serve config with Ray's own
ServeDeploySchema, and the Dockerfiles are read as text against pyproject.toml.

jsonschema and kubernetes-validate are test dependencies (`./dev` installs them). Where the
environment variable CI is set, a missing one fails the run; elsewhere (a bare GPU image
collecting `pytest -m gpu`) this module is skipped instead.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import posixpath
import re
import shlex
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_module

# Test dependencies: a missing one fails in CI and skips this module elsewhere (the GPU image).
jsonschema = require_module("jsonschema")
kubernetes_validate = require_module("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUSTOMIZE_ROOT = DEPLOY / "kubernetes"


def _crd_dir() -> Path:
    """shared/k8s-crds beside the checkout; for a git worktree, beside the main checkout too."""
    candidates = [Path(os.environ["PROMPTMUX_K8S_CRDS"])] if os.environ.get("PROMPTMUX_K8S_CRDS") else []
    candidates += [REPO / "shared" / "k8s-crds", REPO.parent / "shared" / "k8s-crds"]
    common = REPO / ".git"
    if common.is_file():  # a worktree: ".git" names the main repository's git folder
        gitdir = Path(common.read_text().split(":", 1)[1].strip())
        main_checkout = (gitdir.parent.parent if gitdir.parent.name == "worktrees" else gitdir).parent
        candidates.append(main_checkout.parent / "shared" / "k8s-crds")
    return next((c for c in candidates if c.is_dir()), candidates[-1])


CRD_DIR = _crd_dir()
SERVE_YAML = REPO / "serving" / "configs" / "serve.yaml"
DOCKERFILES = {"cuda": DEPLOY / "docker" / "Dockerfile.cuda", "cpu": DEPLOY / "docker" / "Dockerfile.cpu"}
CONSTRAINTS = DEPLOY / "docker" / "constraints.txt"

# Every overlay in the tree, yours included: each must name its own storage class, registry and keys.
OVERLAYS = sorted(p.name for p in (KUSTOMIZE_ROOT / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUSTOMIZATIONS = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
# Oldest Kubernetes the manifests must be valid for.
KUBERNETES_VERSION = "1.30"
RAY_VERSION = "2.60.0"
TORCH_VERSION = "2.13.0"
# The demo tenant's token in the cpu-demo overlay; deploy/README.md publishes it.
DEMO_TOKEN = "pmx-demo-not-for-production"

GRAFANA_JSON = DEPLOY / "grafana" / "promptmux-dashboard.json"
# Oldest KubeRay operator the manifests need: custom serve Service ports kept whole (serve-*
# port rule, appProtocol), authOptions, excludeHeadPodFromServeSvc (deploy/README.md).
MIN_KUBERAY_VERSION = (1, 6, 0)
PLACEHOLDER = "placeholder"


# ---------------------------------------------------------------------------------------
# Loading (once per module: the CRDs are large)


def _load_renderer():
    spec = importlib.util.spec_from_file_location("promptmux_deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_module = _load_renderer()


@lru_cache(maxsize=None)
def rendered(kustomization: str) -> tuple[dict, ...]:
    return tuple(render_module.render(KUSTOMIZE_ROOT / kustomization))


def objects(kustomization: str) -> list[dict]:
    return copy.deepcopy(list(rendered(kustomization)))


def only(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def serve_config(kustomization: str) -> dict:
    return yaml.safe_load(only(objects(kustomization), "RayService")["spec"]["serveConfigV2"])


def the_app(config: dict) -> dict:
    apps = [a for a in config["applications"] if a["name"] == "promptmux"]
    assert len(apps) == 1, f"expected one application named promptmux, got {[a['name'] for a in config['applications']]}"
    return apps[0]


CORE_KINDS = {"Secret", "PersistentVolumeClaim", "NetworkPolicy", "Deployment", "Service", "ConfigMap"}


def ray_pod_templates(rayservice: dict) -> dict[str, dict]:
    """{'head': template, 'worker:<group>': template, ...}"""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        templates[f"worker:{group['groupName']}"] = group["template"]
    return templates


def ray_container(template: dict) -> dict:
    # KubeRay treats the first container as the Ray container.
    return template["spec"]["containers"][0]


def named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def parse_quantity(value: Any) -> float:
    units = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (shared/k8s-crds beside the repository)")
    loaded = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        loaded[crd["spec"]["names"]["kind"]] = strict_schema(version["schema"]["openAPIV3Schema"])
    return loaded


def strict_schema(schema: Any) -> Any:
    """The CRD schema as the API server applies it: unknown fields are errors.

    A structural CRD schema omits `additionalProperties`, but the API server prunes unknown
    fields and `kubectl apply` (strict field validation) rejects them; JSON Schema would
    accept them silently, so close every object that lists its properties.
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{CONSTRAINTS.name}: {line!r} must pin an exact version (name==version)"
            pins[requirement_name(name)] = version
    return pins


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)], with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def shell_commands(instructions: list[tuple[str, str]]) -> list[list[str]]:
    commands = []
    for instruction, arguments in instructions:
        if instruction == "RUN":
            commands.extend(shlex.split(part) for part in arguments.split("&&"))
    return commands


def module_file(module: str) -> Path:
    """Where a `promptmux.*` module lives in the repository (pyproject's package-dir)."""
    package_dir = pyproject()["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items(), key=lambda item: -len(item[0])):
        if module == package or module.startswith(package + "."):
            rest = module[len(package):].lstrip(".").replace(".", "/")
            base = REPO / folder / rest if rest else REPO / folder
            return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    raise AssertionError(f"{module} is under no package-dir mapping of pyproject.toml: {package_dir}")


# ---------------------------------------------------------------------------------------
# The renderer


def test_renderer_builds_the_expected_objects():
    shared = {("PersistentVolumeClaim", "promptmux-prompts"), ("RayService", "promptmux"),
              ("Deployment", "promptmux-redis"), ("Service", "promptmux-redis"),
              ("NetworkPolicy", "promptmux-ray-internal"), ("NetworkPolicy", "promptmux-ray-dashboard"),
              ("NetworkPolicy", "promptmux-ray-metrics"), ("NetworkPolicy", "promptmux-serve-clients"),
              ("NetworkPolicy", "promptmux-redis"), ("PodMonitor", "promptmux-ray"),
              ("PrometheusRule", "promptmux"), ("ConfigMap", "promptmux-grafana-dashboard")}
    names = lambda k: {(o["kind"], o["metadata"]["name"]) for o in objects(k)}  # noqa: E731
    assert names("base") == shared
    assert names("overlays/cpu-demo") == shared | {("Secret", "promptmux-demo-api-keys")}
    assert names("overlays/gpu-t5-xxl") == names("overlays/gpu-t5-xxl-sharded") == shared | {
        ("PersistentVolumeClaim", "promptmux-models")}


def test_renderer_applies_json6902_operations_like_rfc6902():
    doc = {"spec": {"items": [{"name": "a"}, {"name": "b"}], "keep": 1}}
    apply = render_module.apply_json_patch_operation
    apply(doc, {"op": "add", "path": "/spec/items/-", "value": {"name": "c"}})
    apply(doc, {"op": "add", "path": "/spec/items/0", "value": {"name": "first"}})
    apply(doc, {"op": "replace", "path": "/spec/items/1/name", "value": "A"})
    apply(doc, {"op": "remove", "path": "/spec/keep"})
    apply(doc, {"op": "add", "path": "/spec/a~1b", "value": "slash"})
    apply(doc, {"op": "test", "path": "/spec/items/3/name", "value": "c"})
    assert doc == {"spec": {"items": [{"name": "first"}, {"name": "A"}, {"name": "b"}, {"name": "c"}], "a/b": "slash"}}


@pytest.mark.parametrize("operation, message", [
    ({"op": "test", "path": "/spec/x", "value": 2}, "test /spec/x failed"),
    ({"op": "replace", "path": "/spec/missing", "value": 2}, "no field 'missing'"),
    ({"op": "remove", "path": "/spec/list/5"}, "out of range"),
    ({"op": "move", "from": "/spec/x", "path": "/spec/y"}, "'move' is not implemented"),
])
def test_renderer_refuses_bad_operations_with_a_reason(operation, message):
    doc = {"spec": {"x": 1, "list": [1]}}
    with pytest.raises(render_module.RenderError, match=re.escape(message)):
        render_module.apply_json_patch_operation(doc, operation)


def test_renderer_refuses_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: dev-\n")
    with pytest.raises(render_module.RenderError, match="namePrefix"):
        render_module.render(tmp_path)


def test_renderer_sets_images_in_nested_containers(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [r.yaml]\nimages:\n  - {name: registry:5000/app, newTag: '2.0'}\n  - {name: other, newName: mirror/other}\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "apiVersion": "x/v1", "kind": "Thing", "metadata": {"name": "t"},
        "spec": {"deep": {"template": {"spec": {
            "initContainers": [{"name": "i", "image": "other:1.0"}],
            "containers": [{"name": "c", "image": "registry:5000/app:1.0"}, {"name": "d", "image": "unrelated:3"}],
        }}}}}))
    pod = render_module.render(tmp_path)[0]["spec"]["deep"]["template"]["spec"]
    assert [c["image"] for c in pod["containers"]] == ["registry:5000/app:2.0", "unrelated:3"]
    assert pod["initContainers"][0]["image"] == "mirror/other:1.0"


def test_kustomizations_use_only_what_the_renderer_implements():
    for path in KUSTOMIZE_ROOT.rglob("kustomization.yaml"):
        fields = set(yaml.safe_load(path.read_text()))
        assert fields <= render_module.SUPPORTED_FIELDS, f"{path}: {fields - render_module.SUPPORTED_FIELDS}"


# ---------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_core_kinds_and_pod_templates_validate_against_kubernetes_schemas(kustomization):
    objs = objects(kustomization)
    core = [o for o in objs if o["kind"] in CORE_KINDS]
    assert {"PersistentVolumeClaim", "NetworkPolicy", "Deployment", "Service", "ConfigMap"} <= {o["kind"] for o in core}, \
        "the render lost its core objects"
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # The pods KubeRay creates come from these templates: check them as core PodTemplates.
    for role, template in ray_pod_templates(only(objs, "RayService")).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"promptmux-{role.replace(':', '-')}"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rayservice_validates_against_kuberay_crds(kustomization, crds):
    rayservice = only(objects(kustomization), "RayService")
    jsonschema.Draft202012Validator(crds["RayService"]).validate(rayservice)
    # The cluster inside must also be a valid RayCluster spec.
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "promptmux"},
                  "spec": rayservice["spec"]["rayClusterConfig"]}
    jsonschema.Draft202012Validator(crds["RayCluster"]).validate(raycluster)


def test_strict_crd_schema_rejects_a_misspelt_field(crds):
    rayservice = only(objects("base"), "RayService")
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoscalling"):
        jsonschema.Draft202012Validator(crds["RayService"]).validate(rayservice)


# The PodMonitor CRD (prometheus-operator) is not shipped here; this is the part of its
# schema that these manifests use, closed so that a misspelt field fails.
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "selector": {
                    "type": "object", "additionalProperties": False, "minProperties": 1,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "matchExpressions": {"type": "array"}},
                },
                "podMetricsEndpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False, "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "relabelings": {"type": "array", "items": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                               "targetLabel": {"type": "string"}, "action": {"type": "string"},
                                               "regex": {"type": "string"}, "replacement": {"type": "string"}},
                            }},
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_podmonitor_scrapes_every_ray_metrics_port(kustomization):
    objs = objects(kustomization)
    monitor = only(objs, "PodMonitor")
    jsonschema.Draft202012Validator(PODMONITOR_SCHEMA).validate(monitor)
    selector = monitor["spec"]["selector"]["matchLabels"]
    rayservice = only(objs, "RayService")
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    # Ray's node metrics (every pod), the autoscaler's and the dashboard's (head).
    assert scraped == {"metrics", "as-metrics", "dash-metrics"}
    for role, template in ray_pod_templates(rayservice).items():
        labels = {**template["metadata"]["labels"], **KUBERAY_POD_LABELS[role.split(":")[0]]}
        assert selector.items() <= labels.items(), f"{role} pod labels {labels} miss the PodMonitor selector {selector}"
        ports = named_ports(ray_container(template))
        assert ports["metrics"] == int(rayservice_start_params(rayservice, role)["metrics-export-port"]), role
    head = named_ports(ray_container(ray_pod_templates(rayservice)["head"]))
    assert (head["as-metrics"], head["dash-metrics"]) == (44217, 44227), "Ray's autoscaler and dashboard metric ports"


# Labels KubeRay adds to the pods it creates, beyond the template's own.
KUBERAY_POD_LABELS = {"head": {"ray.io/node-type": "head", "ray.io/is-ray-node": "yes"},
                      "worker": {"ray.io/node-type": "worker", "ray.io/is-ray-node": "yes"}}


def rayservice_start_params(rayservice: dict, role: str) -> dict:
    cluster = rayservice["spec"]["rayClusterConfig"]
    if role == "head":
        return cluster["headGroupSpec"]["rayStartParams"]
    group = role.split(":", 1)[1]
    return next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == group)["rayStartParams"]


# ---------------------------------------------------------------------------------------
# The Serve config


def unknown_serve_keys(raw: Any, model: Any, where: str) -> list[str]:
    """Keys Ray's schema would ignore silently (it allows extra fields): typos, in practice."""
    from pydantic import BaseModel
    from ray.serve.config import AutoscalingConfig

    problems = []
    fields = type(model).model_fields
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{where}.{key}")
            continue
        parsed = getattr(model, key)
        if key == "autoscaling_config" and isinstance(value, dict):
            problems += [f"{where}.autoscaling_config.{k}" for k in value if k not in AutoscalingConfig.model_fields]
        elif isinstance(parsed, BaseModel) and isinstance(value, dict):
            problems += unknown_serve_keys(value, parsed, f"{where}.{key}")
        elif isinstance(parsed, list) and isinstance(value, list):
            for index, (raw_item, item) in enumerate(zip(value, parsed)):
                if isinstance(item, BaseModel):
                    problems += unknown_serve_keys(raw_item, item, f"{where}.{key}[{index}]")
    return problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_parses_with_rays_schema(kustomization):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    raw = serve_config(kustomization)
    parsed = ServeDeploySchema.model_validate(raw)
    assert unknown_serve_keys(raw, parsed, "serveConfigV2") == []
    for deployment in the_app(raw)["deployments"]:
        AutoscalingConfig(**deployment["autoscaling_config"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_follows_the_serving_contract(kustomization):
    config = serve_config(kustomization)
    app = the_app(config)
    assert app["import_path"] == "promptmux.serving.replica.app:build_app"
    assert app["route_prefix"] == "/"  # the OpenAI-compatible API at /v1, JSON 404s elsewhere
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        "promptmux.serving.rpc.proxy.add_PromptmuxServicer_to_server"]
    assert config["grpc_options"]["port"] == 9000
    assert config["http_options"]["port"] == 8000
    assert set(app["args"]) <= {"model", "store", "engine", "serving"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_args_build_a_valid_promptmux_config(kustomization):
    args = the_app(serve_config(kustomization))["args"]
    from promptmux.serving.config import AppConfig

    # The same parse build_app does: a typo here fails the deploy.
    config = AppConfig.from_args(args)
    assert config.serving.api_keys_file == args["serving"]["api_keys_file"]


def test_serve_import_path_and_servicer_function_import():
    module_name, _, attribute = the_app(serve_config("base"))["import_path"].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attribute)), f"{module_name}.{attribute} must be the application builder"
    config = serve_config("base")
    servicer = config["grpc_options"]["grpc_servicer_functions"][0]
    # Where the application states its own names, the Serve config must use them.
    stated = {"APP_NAME": the_app(config)["name"], "ROUTE_PREFIX": the_app(config)["route_prefix"],
              "GRPC_SERVICER": servicer}
    for constant, ours in stated.items():
        if hasattr(module, constant):
            assert getattr(module, constant) == ours, f"{module_name}.{constant} is {getattr(module, constant)!r}"
    servicer_module, _, function = servicer.rpartition(".")
    assert callable(getattr(importlib.import_module(servicer_module), function))


def test_grpc_messages_survive_the_pickling_between_proxy_and_replica():
    # Ray Serve's gRPC proxy pickles each request to hand it to a replica (and the reply
    # back), by module path: generated classes must name an importable module.
    from promptmux.serving.rpc.proto_build import ensure_built

    ensure_built()
    pb2 = importlib.import_module("promptmux.serving.rpc.proto_gen.promptmux_pb2")
    request = pb2.GenerateRequest(task="reverse", text="hello")
    try:
        assert pickle.loads(pickle.dumps(request)) == request
    except pickle.PicklingError as error:
        pytest.fail(
            f"{error}: generated messages claim module {type(request).__module__!r}, which does not import; "
            f"proto_build must register them under {pb2.__name__!r} (its BuildTopDescriptorsAndMessages name)")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_names_the_deployment_build_app_creates(kustomization):
    # Serve rejects options for a deployment the application does not have.
    from promptmux.serving.replica.app import build_app

    app = the_app(serve_config(kustomization))
    built = build_app(app["args"])
    assert [d["name"] for d in app["deployments"]] == [built._bound_deployment.name]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_agrees_with_the_projects_serve_yaml(kustomization):
    project = yaml.safe_load(SERVE_YAML.read_text())
    assert "applications" in project, (
        f"{SERVE_YAML.relative_to(REPO)} has no `applications`: it is expected to be a Serve config "
        f"(ServeDeploySchema) with the promptmux application, which serveConfigV2 mirrors")
    ours, theirs = serve_config(kustomization), project
    app, project_app = the_app(ours), the_app(theirs)
    for key in ("import_path", "route_prefix"):
        assert app[key] == project_app[key], f"{key}: {app[key]!r} here, {project_app[key]!r} in serve.yaml"
    assert {d["name"] for d in app["deployments"]} == {d["name"] for d in project_app.get("deployments", [])}, \
        "deployment names must match serve.yaml's, or Serve rejects the config for an unknown deployment"
    for section in ("grpc_options",):
        if section in theirs:
            assert ours[section] == theirs[section], f"{section} differs from serve.yaml"
    if "http_options" in theirs and "port" in theirs["http_options"]:
        assert ours["http_options"]["port"] == theirs["http_options"]["port"]


# ---------------------------------------------------------------------------------------
# Agreement across the RayService, its containers and the Serve config


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ports_agree_across_workers_serve_config_and_the_h2c_serve_service(kustomization):
    config = serve_config(kustomization)
    rayservice = only(objects(kustomization), "RayService")
    expected = {"serve": config["http_options"]["port"], "serve-grpc": config["grpc_options"]["port"]}
    templates = ray_pod_templates(rayservice)
    for role, template in templates.items():
        ports = named_ports(ray_container(template))
        if role == "head":
            assert not expected.keys() & ports.keys(), "the head takes no client traffic"
            assert "client" not in ports and 10001 not in ports.values(), "no Ray client port"
            continue
        for name, number in expected.items():
            assert ports.get(name) == number, f"{role}: port {name!r} is {ports.get(name)}, Serve uses {number}"
    spec = rayservice["spec"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    service = spec["serveService"]
    assert service["metadata"]["name"] == "promptmux-serve-svc"
    by_target = {p["targetPort"]: p for p in service["spec"]["ports"]}
    assert set(by_target) == set(expected)
    for name, number in expected.items():
        assert by_target[name]["port"] == number
    assert by_target["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c", "L7 gateways must speak HTTP/2 cleartext to gRPC"
    # Istio reads the protocol from the start of the port name (or appProtocol): grpc, http.
    assert by_target["serve-grpc"]["name"].startswith("grpc") and by_target["serve"]["name"].startswith("http")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_containers_are_named_sized_and_mount_only_declared_volumes(kustomization):
    rayservice = only(objects(kustomization), "RayService")
    for role, template in ray_pod_templates(rayservice).items():
        assert ray_container(template)["name"] == ("ray-head" if role == "head" else "ray-worker")
        # Ray sizes itself from the limits; equal requests keep the scheduler's view the same.
        resources = ray_container(template)["resources"]
        assert resources["requests"] == resources["limits"], f"{role}: requests and limits differ"
        volumes = {v["name"] for v in template["spec"].get("volumes", [])}
        for container in template["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{role}: mount {mount['name']!r} has no volume"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_workers_mount_the_keys_store_and_models(kustomization):
    objs = objects(kustomization)
    args = the_app(serve_config(kustomization))["args"]
    claims = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    keys_file = args["serving"]["api_keys_file"]
    assert keys_file == "/etc/promptmux/api-keys/keys.yaml"
    assert args["store"]["root"] == "/var/lib/promptmux/prompts"
    templates = ray_pod_templates(only(objs, "RayService"))
    head = templates.pop("head")
    # An NFS stall on the head would block the GCS: it mounts no data volume at all.
    assert not head["spec"].get("volumes") and not ray_container(head).get("volumeMounts")
    for role, template in templates.items():
        container = ray_container(template)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("PROMPTMUX_API_KEYS_FILE") == keys_file, role
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"].rstrip("/"): volumes[m["name"]] for m in container["volumeMounts"]}
        assert "secretName" in mounts[posixpath.dirname(keys_file)]["secret"], role
        store_volume = mounts[args["store"]["root"]]
        claim = claims[store_volume["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica shares the prompt store"


def test_the_application_builder_reads_no_file_so_the_head_needs_no_mounts(tmp_path):
    # Serve may run build_app on the head, which mounts nothing: it must not touch the store,
    # the models or the key file (the replicas, on workers, read those).
    from promptmux.serving.replica.app import build_app

    args = copy.deepcopy(the_app(serve_config("overlays/gpu-t5-xxl"))["args"])
    args["store"]["root"] = str(tmp_path / "no-store")
    args["model"]["source"] = str(tmp_path / "no-models" / "t5-xxl")
    args["serving"]["api_keys_file"] = str(tmp_path / "no-keys.yaml")
    build_app(args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kustomization", [k for k in KUSTOMIZATIONS if any(o["kind"] == "Secret" for o in rendered(k))])
def test_api_keys_secret_follows_the_contract_format(kustomization):
    objs = objects(kustomization)
    secret = only(objs, "Secret")
    named = {v["secret"]["secretName"] for t in ray_pod_templates(only(objs, "RayService")).values()
             for v in t["spec"].get("volumes", []) if "secret" in v}
    assert named == {secret["metadata"]["name"]}, "the workers mount the Secret this overlay ships"
    text = secret["stringData"]["keys.yaml"]
    keys = yaml.safe_load(text)["keys"]
    assert isinstance(keys, list) and keys, "a shipped key Secret lists keys"
    for entry in keys:
        assert set(entry) == {"tenant", "sha256", "admin"}, entry
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), "sha256 is the hex digest of the token, never the token"
        assert isinstance(entry["admin"], bool) and isinstance(entry["tenant"], str) and entry["tenant"]
    assert len({e["tenant"] for e in keys}) == len(keys), "one entry per tenant"
    from promptmux.serving.replica.auth import parse_key_file

    # What a replica reads from the mounted file.
    assert {p.tenant for p in parse_key_file(text, "keys.yaml").values()} == {e["tenant"] for e in keys}


def test_demo_key_is_the_token_the_readme_publishes():
    keys = yaml.safe_load(only(objects("overlays/cpu-demo"), "Secret")["stringData"]["keys.yaml"])["keys"]
    assert [k["sha256"] for k in keys] == [hashlib.sha256(DEMO_TOKEN.encode()).hexdigest()]
    assert DEMO_TOKEN in (DEPLOY / "README.md").read_text()
    for overlay in ("overlays/gpu-t5-xxl", "overlays/gpu-t5-xxl-sharded"):
        objs = objects(overlay)
        assert not [o for o in objs if o["kind"] == "Secret"], "the GPU overlays ship no key list: you create the Secret"
        worker = ray_pod_templates(only(objs, "RayService"))["worker:gpu"]
        assert {v["secret"]["secretName"] for v in worker["spec"]["volumes"] if "secret" in v} == {"promptmux-api-keys"}
        assert "kubectl create secret generic promptmux-api-keys" in (DEPLOY / "README.md").read_text()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_gpus_per_replica_agree_with_the_worker_pods(kustomization):
    rayservice = only(objects(kustomization), "RayService")
    app = the_app(serve_config(kustomization))
    num_gpus = app["deployments"][0]["ray_actor_options"].get("num_gpus", 0)
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        template = group["template"]
        resources = ray_container(template)["resources"]
        requested = resources["requests"].get("nvidia.com/gpu")
        assert requested == resources["limits"].get("nvidia.com/gpu"), "GPU requests and limits must be equal"
        if num_gpus:
            assert int(requested) == num_gpus, f"pods have {requested} GPUs, a replica wants {num_gpus}: one replica per pod"
            tolerations = template["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), "GPU nodes are usually tainted"
        else:
            assert requested is None and "tolerations" not in template["spec"]
    head = ray_container(ray_pod_templates(rayservice)["head"])
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    device = app["args"]["model"].get("device", "cpu")
    assert (device == "cpu") == (num_gpus == 0), f"model.device {device!r} with num_gpus {num_gpus}"


def test_cpu_demo_runs_the_embedded_model_without_gpus():
    app = the_app(serve_config("overlays/cpu-demo"))
    assert app["args"]["model"]["source"] == "embedded"
    assert "nvidia.com/gpu" not in yaml.safe_dump(objects("overlays/cpu-demo"))


@pytest.mark.parametrize("overlay, gpus", [("overlays/gpu-t5-xxl", 1), ("overlays/gpu-t5-xxl-sharded", 2)])
def test_gpu_t5_xxl_loads_the_checkpoint_from_the_models_volume(overlay, gpus):
    objs = objects(overlay)
    app = the_app(serve_config(overlay))
    model = app["args"]["model"]
    assert model["source"] == "/models/t5-xxl"
    assert model["dtype"] == "bfloat16", "T5 overflows in float16"
    assert model["quantization"] in {"none", "8bit"}
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == gpus
    # One GPU per replica unless the weights do not fit: sharding splits layers, and only one
    # GPU computes at a time.
    assert ("device_map" in model) == (gpus > 1)
    if gpus > 1:
        assert model["device_map"] == "auto" and len(model["max_memory"]) == gpus
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    for role, template in ray_pod_templates(only(objs, "RayService")).items():
        if role == "head":
            continue
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mount = next(m for m in ray_container(template)["volumeMounts"] if model["source"].startswith(m["mountPath"] + "/"))
        assert mount["readOnly"] is True, role
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims, role


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_autoscaling_fits_the_worker_group(kustomization):
    from promptmux.serving.config import EngineConfig

    rayservice = only(objects(kustomization), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == RAY_VERSION
    app = the_app(serve_config(kustomization))
    max_batch = app["args"].get("engine", {}).get("max_batch_size", EngineConfig.max_batch_size)
    for deployment in app["deployments"]:
        scaling = deployment["autoscaling_config"]
        assert "num_replicas" not in deployment, "num_replicas fights autoscaling_config"
        # Two replicas at least: an in-place update restarts replicas one at a time, so one serves.
        assert 2 <= scaling["min_replicas"] <= scaling["max_replicas"]
        assert scaling["target_ongoing_requests"] >= max_batch, "replicas would scale out before a batch fills"
        max_ongoing = effective_deployment_options(app["args"], deployment)["max_ongoing_requests"]
        if max_ongoing is not None:
            assert max_ongoing >= max_batch, "or batches never fill (serving/replica/app.py, deployment_defaults)"
            assert scaling["target_ongoing_requests"] <= max_ongoing
        actor = deployment["ray_actor_options"]
        for resource, key in (("nvidia.com/gpu", "num_gpus"), ("cpu", "num_cpus")):
            capacity = sum(
                group["maxReplicas"] * parse_quantity(ray_container(group["template"])["resources"]["limits"].get(resource, 0))
                for group in cluster["workerGroupSpecs"])
            wanted = scaling["max_replicas"] * actor.get(key, 0)
            assert wanted <= capacity, f"max_replicas needs {wanted} {resource}, the worker group has {capacity} at most"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def effective_deployment_options(args: dict, deployment: dict) -> dict:
    """The Serve config's options over the application's own defaults (serving/replica/app.py)."""
    from promptmux.serving.replica.app import deployment_defaults
    from promptmux.serving.config import AppConfig

    options = dict(deployment_defaults(AppConfig.from_args(args)))
    options.update(deployment)
    return options


# ---------------------------------------------------------------------------------------
# Images and Dockerfiles


def split_image(ref: str) -> tuple[str, str]:
    return render_module._split_image(ref)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_images_are_pinned_and_match_the_device(kustomization):
    rayservice = only(objects(kustomization), "RayService")
    uses_gpus = any("nvidia.com/gpu" in ray_container(g["template"])["resources"]["limits"]
                    for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    for role, template in ray_pod_templates(rayservice).items():
        for container in template["spec"]["containers"]:
            name, suffix = split_image(container["image"])
            assert suffix and suffix != ":latest", f"{role}: image {container['image']!r} must carry a version tag"
            assert suffix.endswith("-cuda" if uses_gpus else "-cpu"), f"{role}: {container['image']} on the wrong device"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_image_carries_a_version(kustomization):
    for role, (_, spec) in promptmux_pods(objects(kustomization)).items():
        for container in spec["containers"] + spec.get("initContainers", []):
            name, suffix = split_image(container["image"])
            assert re.fullmatch(r"(:[\w.-]*\d[\w.-]*|@sha256:[0-9a-f]{64})", suffix) and suffix != ":latest", \
                f"{role}: image {container['image']!r} must carry a version tag or digest"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_base_image_matches_ray_and_python(flavour):
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    bases = [args for instruction, args in instructions if instruction == "FROM"]
    assert len(bases) == 1, "one stage: the Ray image is the runtime"
    name, tag = split_image(bases[0])
    assert name == "rayproject/ray"
    assert re.fullmatch(rf":{re.escape(RAY_VERSION)}-py311-({'cu[0-9]+' if flavour == 'cuda' else 'cpu'})", tag), tag
    assert constraints()["ray"] == RAY_VERSION


@pytest.mark.parametrize("flavour, extras", [("cuda", {"serve", "gpu"}), ("cpu", {"serve"})])
def test_dockerfile_install_line_matches_pyproject_extras(flavour, extras):
    commands = [c for c in shell_commands(dockerfile_instructions(DOCKERFILES[flavour])) if c[:2] == ["pip", "install"]]
    project = [c for c in commands if any(a.startswith(".[") for a in c)]
    assert len(project) == 1, "exactly one install of the project"
    target = next(a for a in project[0] if a.startswith(".["))
    assert set(target[2:-1].split(",")) == extras
    assert extras <= set(pyproject()["project"]["optional-dependencies"])
    for command in commands:
        assert "--constraint" in command or "-c" in command, f"unpinned install: {' '.join(command)}"
    torch_installs = [c for c in commands if any(requirement_name(a) == "torch" for a in c[2:] if not a.startswith("-"))]
    if flavour == "cpu":
        assert len(torch_installs) == 1 and f"torch=={TORCH_VERSION}" in torch_installs[0]
        assert "https://download.pytorch.org/whl/cpu" in torch_installs[0], "the CPU image takes the CPU wheel"
    else:
        assert torch_installs == [], "the CUDA image takes torch from pyproject, pinned by the constraints"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_constraints_pin_every_requirement_the_image_installs(flavour):
    project = pyproject()["project"]
    extras = {"serve", "gpu"} if flavour == "cuda" else {"serve"}
    required = {requirement_name(r) for r in project["dependencies"]}
    for extra in extras:
        required |= {requirement_name(r) for r in project["optional-dependencies"][extra]}
    pins = constraints()
    assert required <= set(pins), f"unpinned in {CONSTRAINTS.name}: {sorted(required - set(pins))}"
    assert pins["torch"] == TORCH_VERSION


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_copies_only_paths_that_exist(flavour):
    for instruction, arguments in dockerfile_instructions(DOCKERFILES[flavour]):
        if instruction != "COPY":
            continue
        sources = [a for a in shlex.split(arguments) if not a.startswith("--")][:-1]
        missing = [s for s in sources if "*" not in s and not (REPO / s).exists()]
        assert not missing, f"COPY sources missing from the repository: {missing}"
        # A wildcard may match nothing only beside a plain path, or the build fails.
        assert any("*" not in s for s in sources), f"COPY {arguments} may copy nothing"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_modules_and_entry_point_exist(flavour):
    instructions = dockerfile_instructions(DOCKERFILES[flavour])
    modules = [c[c.index("-m") + 1] for c in shell_commands(instructions) if c[:2] == ["python", "-m"]]
    assert modules == ["promptmux.serving.rpc.proto_build"]
    cmd = yaml.safe_load(next(args for instruction, args in instructions if instruction == "CMD"))
    scripts = pyproject()["project"]["scripts"]
    assert cmd[0] in scripts, f"CMD runs {cmd[0]!r}, which pyproject.toml's [project.scripts] does not define"
    entry_module = scripts[cmd[0]].split(":")[0]
    missing = [m for m in modules + [entry_module] if not module_file(m).exists()]
    assert not missing, f"the image runs {missing}, which do not exist in the repository"
    from promptmux.serving.cli.main import build_parser

    subcommands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert cmd[1] in subcommands, f"CMD runs `promptmux {cmd[1]}`, which the CLI does not offer: {sorted(subcommands)}"


def test_result_files_are_data_the_package_never_ships():
    """benchmarks/results/ holds measured data, not code: no listed package and no package-data
    pattern reaches it, and nothing lies loose at its top (every run has its dated folder)."""
    tool = pyproject()["tool"]["setuptools"]
    assert not [p for p in tool["packages"] if p.startswith("promptmux.benchmarks.results")]
    for package, patterns in tool["package-data"].items():
        base = REPO.joinpath(*package.split(".")[1:]) if package != "promptmux" else REPO
        if package.startswith("promptmux.benchmarks"):
            base = REPO / "benchmarks" / Path(*package.split(".")[2:])
        for pattern in patterns:
            shipped = [path for path in base.glob(pattern) if "results" in path.relative_to(REPO).parts]
            assert not shipped, f"{package}: {pattern!r} ships result files {shipped[:3]}"
    results = REPO / "benchmarks" / "results"
    loose = [p.name for p in results.iterdir() if p.is_file()]
    assert not loose, f"result files loose at the top of benchmarks/results/: {loose}; move them into their dated run"


def test_run_time_files_are_package_data_so_a_non_editable_install_ships_them():
    # The images install the project as a wheel: a file under serving/assets or
    # serving/configs that no package-data pattern matches is missing in every pod.
    package_data = pyproject()["tool"]["setuptools"]["package-data"]
    serving = REPO / "serving"
    shipped = {
        path
        for package, patterns in package_data.items() if package.startswith("promptmux.serving")
        for pattern in patterns
        for path in serving.joinpath(*package.split(".")[2:]).glob(pattern) if path.is_file()
    }
    needed = {path for folder in ("assets", "configs") for path in (serving / folder).rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    needed.add(serving / "rpc" / "promptmux.proto")
    unshipped = sorted(str(path.relative_to(REPO)) for path in needed - shipped)
    assert not unshipped, (
        f"{unshipped} would be left out of the image; add a matching pattern (e.g. 'assets/**/*') to "
        f"pyproject.toml's [tool.setuptools.package-data] \"promptmux.serving\"")


# ---------------------------------------------------------------------------------------
# Closed by default, explicit choices, hardening (issue: production KubeRay)


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def placeholders(objs: list[dict]) -> list[str]:
    """Where a base placeholder survives: storage class, image registry, keys Secret."""
    found = []
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "PersistentVolumeClaim" and PLACEHOLDER in str(obj["spec"].get("storageClassName", PLACEHOLDER)):
            found.append(f"{where}: storageClassName (an RWX class of your cluster)")
        if obj["kind"] == "RayService":
            for role, template in ray_pod_templates(obj).items():
                for container in template["spec"]["containers"]:
                    registry = container["image"].split("/")[0]
                    if PLACEHOLDER in container["image"] or "." not in registry and ":" not in registry:
                        found.append(f"{where} {role}: image {container['image']} (your registry, in `images:`)")
                for volume in template["spec"].get("volumes", []):
                    if "secret" in volume and PLACEHOLDER in volume["secret"]["secretName"]:
                        found.append(f"{where} {role}: keys Secret {volume['secret']['secretName']}")
    return found


def test_the_base_leaves_storage_class_registry_and_keys_secret_to_the_overlay():
    found = placeholders(objects("base"))
    assert len([f for f in found if "storageClassName" in f]) == 1
    assert len([f for f in found if "image" in f]) == 2  # head and worker
    assert len([f for f in found if "keys Secret" in f]) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_names_its_storage_class_registry_and_keys_secret(overlay):
    found = placeholders(objects(f"overlays/{overlay}"))
    assert not found, f"overlays/{overlay} leaves base placeholders: {found}"
    assert PLACEHOLDER not in yaml.safe_dump(objects(f"overlays/{overlay}"))


def test_an_overlay_that_forgets_a_choice_fails_the_check(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{KUSTOMIZE_ROOT / 'base'}]\nimages:\n  - {{name: placeholder.invalid/promptmux, newName: r.io/p}}\n")
    found = placeholders(render_module.render(tmp_path))
    assert any("storageClassName" in f for f in found) and any("keys Secret" in f for f in found)
    assert not any("image" in f for f in found)


def promptmux_pods(objs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """{pod role: (labels as the cluster sees them, pod spec)} for every pod promptmux runs."""
    pods = {}
    for role, template in ray_pod_templates(only(objs, "RayService")).items():
        pods[role] = ({**template["metadata"]["labels"], **KUBERAY_POD_LABELS[role.split(":")[0]]}, template["spec"])
    for deployment in (o for o in objs if o["kind"] == "Deployment"):
        pods[deployment["metadata"]["name"]] = (deployment["spec"]["template"]["metadata"]["labels"],
                                                deployment["spec"]["template"]["spec"])
    return pods


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def admitted(objs: list[dict], role: str) -> list[tuple[dict, set[str] | None]]:
    """[(peer, port names or None for every port)] that NetworkPolicies admit to pod `role`."""
    labels, _ = promptmux_pods(objs)[role]
    rules = []
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        if selects(policy["spec"]["podSelector"], labels):
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits everyone"
                ports = {p["port"] for p in rule["ports"]} if "ports" in rule else None
                rules.extend((peer, ports) for peer in rule["from"])
    return rules


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_network_policies_close_every_pod_and_admit_only_the_intended_callers(kustomization):
    objs = objects(kustomization)
    pods = promptmux_pods(objs)
    ray_peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "promptmux", "ray.io/is-ray-node": "yes"}}}
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    clients = {"namespaceSelector": {"matchLabels": {"promptmux.io/client": "true"}}}
    metrics = {"metrics", "as-metrics", "dash-metrics"}
    for role, (labels, spec) in pods.items():
        rules = admitted(objs, role)
        assert rules, f"{role} is selected by no NetworkPolicy: open to every pod of the cluster"
        port_names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        for peer, ports in rules:
            assert ports is None or ports & port_names, f"{role}: a policy admits to ports {ports} it has none of"
            if peer == ray_peer:
                assert ports is None and labels.get("ray.io/is-ray-node") == "yes", "Ray pods reach Ray pods only"
            elif peer == operator:
                assert role == "head" and ports == {"dashboard"}, "the operator reaches the dashboard only"
            elif peer == monitoring:
                assert ports <= metrics, "monitoring reaches metrics only"
            elif peer == clients:
                assert role.startswith("worker") and ports == {"serve", "serve-grpc"}, "clients reach health and gRPC only"
            else:
                # The head, and KubeRay's Redis cleanup Job (built from the head's template).
                head_template = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "promptmux",
                                                                 "app.kubernetes.io/component": "ray-head"}}}
                assert role == "promptmux-redis" and peer == head_template and ports == {"redis"}, (role, peer)
    head_rules = admitted(objs, "head")
    assert any(peer == operator for peer, _ in head_rules)
    assert not any(peer == clients for peer, _ in head_rules), "the head takes no client traffic"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ray_token_auth_gcs_fault_tolerance_and_no_client_port(kustomization):
    objs = objects(kustomization)
    cluster = only(objs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    head_ports = named_ports(ray_container(cluster["headGroupSpec"]["template"]))
    assert "client" not in head_ports and 10001 not in head_ports.values()
    # The GCS keeps its tables in the Redis this kustomization runs, with the password that Redis uses.
    ft = cluster["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].partition(":")
    service = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    redis = only(objs, "Deployment")
    assert selects({"matchLabels": service["spec"]["selector"]}, redis["spec"]["template"]["metadata"]["labels"])
    redis_env = {e["name"]: e for e in redis["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"] == ft["redisPassword"]["valueFrom"]
    assert "$(REDIS_PASSWORD)" in redis["spec"]["template"]["spec"]["containers"][0]["args"]


def restricted_violations(where: str, pod: dict, containers: list[dict]) -> list[str]:
    """Pod Security Standards, "restricted" profile (Kubernetes 1.30), for one pod spec."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{where}: {field}")
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"{where}: volume {volume['name']} of type {kinds - allowed_volumes}")
    for container in containers:
        sc = container.get("securityContext", {})
        name = f"{where}/{container.get('name', '?')}"
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities must drop ALL (and add at most NET_BIND_SERVICE)")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{name}: seccompProfile RuntimeDefault")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_passes_pod_security_restricted(kustomization):
    objs = objects(kustomization)
    problems = []
    rayservice = only(objs, "RayService")
    for role, (labels, spec) in promptmux_pods(objs).items():
        problems += restricted_violations(role, spec, spec["containers"] + spec.get("initContainers", []))
    # KubeRay adds the autoscaler as a sidecar of the head: its securityContext is set here.
    cluster = rayservice["spec"]["rayClusterConfig"]
    head_sc = cluster["headGroupSpec"]["template"]["spec"]["securityContext"]
    problems += restricted_violations("autoscaler sidecar", {"securityContext": head_sc},
                                      [{"name": "autoscaler", "securityContext": cluster["autoscalerOptions"]["securityContext"]}])
    assert not problems, problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_upgrades_keep_serving(kustomization):
    spec = only(objects(kustomization), "RayService")["spec"]
    # Incremental upgrades split traffic with an HTTPRoute on Serve's HTTP port: gRPC would not
    # follow it, so a cluster upgrade is blue-green, and deploy/README.md says what clients see.
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    app = the_app(serve_config(kustomization))
    deployment = app["deployments"][0]
    scaling = deployment["autoscaling_config"]
    assert scaling["min_replicas"] >= 2
    # In-place updates start replacements before stopping old replicas, one pod of headroom.
    surge = -(-deployment["max_surge_percent"] * scaling["max_replicas"] // 100)
    assert surge >= 1
    for group in spec["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["minReplicas"] >= scaling["min_replicas"], "the worker group starts with room for every minimum replica"
        assert group["maxReplicas"] >= scaling["max_replicas"] + surge, "no room for the update's surge replica"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_health_check_limits_fit_serves_timeout(kustomization):
    from promptmux.serving.config import AppConfig

    app = the_app(serve_config(kustomization))
    serving = AppConfig.from_args(app["args"]).serving
    deployment = app["deployments"][0]
    # The replica's own store probe must time out first, so its message says why.
    assert deployment["health_check_timeout_s"] > serving.store_check_timeout_s
    assert serving.engine_stall_timeout_s >= 2 * deployment["health_check_period_s"]


def test_minimum_kuberay_version_is_documented_and_checked():
    check = _load_module(DEPLOY / "check_operator.py", "promptmux_check_operator")
    assert check.MIN_KUBERAY_VERSION == MIN_KUBERAY_VERSION
    wanted = ".".join(map(str, MIN_KUBERAY_VERSION))
    readme = (DEPLOY / "README.md").read_text()
    assert f"KubeRay operator **{wanted} or newer**" in readme
    assert f"--version {wanted}" in readme and "python deploy/check_operator.py" in readme
    assert check.check_image(f"quay.io/kuberay/operator:v{wanted}") is None
    assert check.check_image("quay.io/kuberay/operator:v1.7.2-rc.1") is None
    assert "needs >= 1.6.0" in check.check_image("quay.io/kuberay/operator:v1.5.1")
    assert "cannot tell" in check.check_image("quay.io/kuberay/operator@sha256:" + "0" * 64)


# The PrometheusRule CRD (prometheus-operator v0.82.2, monitoring.coreos.com_prometheusrules.yaml,
# spec.versions[v1].schema) is not in shared/k8s-crds: this is its schema for the fields
# that matter, transcribed and closed so that a misspelt field fails.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
PROMETHEUSRULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "properties": {"groups": {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": _DURATION},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "limit": {"type": "integer"},
                    "partial_response_strategy": {"type": "string"},
                    "query_offset": {"type": "string", "pattern": _DURATION},
                    "rules": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                            "for": {"type": "string", "pattern": _DURATION},
                            "keep_firing_for": {"type": "string", "minLength": 1, "pattern": _DURATION},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    }},
                },
            }}}},
    },
}

# Ray Serve's own series that the alerts read (ray.serve._private.deployment_state).
SERVE_METRICS = {"ray_serve_deployment_replica_healthy"}


def exported_promptmux_series() -> set[str]:
    """Every series name a replica exports, from serving/replica/metrics.py's declarations."""
    from ray.util.metrics import Counter, Gauge, Histogram

    from promptmux.serving.replica.metrics import ServingMetrics

    series = set()
    for metric in replica_metrics(ServingMetrics()):
        name = "ray_" + metric._name
        if isinstance(metric, Counter):
            series.add(name + "_total")
        elif isinstance(metric, Histogram):
            series |= {name + "_bucket", name + "_count", name + "_sum"}
        elif isinstance(metric, Gauge):
            series.add(name)
    return series


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bray_[a-z0-9_]+\b", expr))


# Labels Prometheus adds to every scraped series (PodMonitor targets, histogram buckets).
SCRAPE_LABELS = {"le", "pod", "namespace", "ray_io_cluster", "job", "instance"}
SERVE_METRIC_TAGS = {"application", "deployment"}


def promptmux_tags() -> set[str]:
    from promptmux.serving.replica.metrics import ServingMetrics

    return {tag for metric in replica_metrics(ServingMetrics()) for tag in metric._tag_keys}


def replica_metrics(metrics) -> list:
    from ray.util.metrics import Metric

    return [value for value in vars(metrics).values() if isinstance(value, Metric)]


def unknown_labels(expr: str) -> set[str]:
    """Label names a query filters or groups by that its series never carry."""
    allowed = promptmux_tags() | SCRAPE_LABELS
    if metric_names(expr) & SERVE_METRICS:
        allowed |= SERVE_METRIC_TAGS
    used = set()
    for selector in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in grouping.split(",") if label.strip()}
    return used - allowed


def test_exported_series_are_what_the_metrics_endpoint_shows():
    series = exported_promptmux_series()
    assert {"ray_promptmux_requests_total", "ray_promptmux_queue_depth", "ray_promptmux_batch_size_bucket",
            "ray_promptmux_prompt_cache_hits_total"} <= series


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_alert_rules_validate_and_read_only_exported_series(kustomization):
    rule = only(objects(kustomization), "PrometheusRule")
    jsonschema.Draft202012Validator(PROMETHEUSRULE_SCHEMA).validate(rule)
    known = exported_promptmux_series() | SERVE_METRICS
    alerts = {}
    for group in rule["spec"]["groups"]:
        for entry in group["rules"]:
            names = metric_names(entry["expr"])
            assert names and names <= known, f"{entry['alert']} reads series nobody exports: {names - known}"
            assert not unknown_labels(entry["expr"]), f"{entry['alert']} uses labels its series lack: {unknown_labels(entry['expr'])}"
            assert entry["expr"].count("(") == entry["expr"].count(")"), entry["alert"]
            assert entry["labels"]["severity"] in {"warning", "critical"}
            assert entry["annotations"]["summary"] and entry["annotations"]["description"]
            alerts[entry["alert"]] = entry["expr"]
    # Error rate, p99, queue saturation and replica health, as promised.
    assert "ray_promptmux_requests_total" in alerts["PromptmuxHighErrorRate"]
    assert "histogram_quantile(0.99" in alerts["PromptmuxHighP99Latency"]
    assert "ray_promptmux_queue_depth" in alerts["PromptmuxQueueSaturated"]
    assert "ray_serve_deployment_replica_healthy" in alerts["PromptmuxReplicaUnhealthy"]


def test_prometheusrule_schema_rejects_a_misspelt_field():
    rule = only(objects("base"), "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    with pytest.raises(jsonschema.ValidationError, match="expresion"):
        jsonschema.Draft202012Validator(PROMETHEUSRULE_SCHEMA).validate(rule)


# The part of Grafana's dashboard model (schemaVersion 39) the dashboard uses, closed.
GRAFANA_DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "panels", "schemaVersion"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
            "properties": {
                "id": {"type": "integer"}, "type": {"enum": ["timeseries", "stat", "gauge", "table"]},
                "title": {"type": "string", "minLength": 1}, "description": {"type": "string"},
                "datasource": {"type": "object", "required": ["type", "uid"]},
                "fieldConfig": {"type": "object"},
                "gridPos": {"type": "object", "required": ["x", "y", "w", "h"], "additionalProperties": False,
                            "properties": {k: {"type": "integer", "minimum": 0, "maximum": 24 if k in "xw" else 1000}
                                           for k in ("x", "y", "w", "h")}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["refId", "expr"],
                    "properties": {"refId": {"type": "string"}, "expr": {"type": "string", "minLength": 1},
                                   "legendFormat": {"type": "string"}, "datasource": {"type": "object"}},
                }},
            },
        }},
    },
}


def test_grafana_dashboard_parses_and_every_query_names_an_exported_series():
    dashboard = json.loads(GRAFANA_JSON.read_text())
    jsonschema.Draft202012Validator(GRAFANA_DASHBOARD_SCHEMA).validate(dashboard)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exported = exported_promptmux_series()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: query names no ray_* series"
            assert names <= exported, f"panel {panel['title']!r} reads series the server never exports: {names - exported}"
            # ray.util.metrics carry only their own tags (no Serve application/replica tags).
            assert not unknown_labels(target["expr"]), f"panel {panel['title']!r} uses labels its series lack"
            assert target["expr"].count("(") == target["expr"].count(")")
            used |= names
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("status", "error", "latency", "batch size", "tasks per batch", "cache hit", "queue depth"):
        assert wanted in titles, f"the dashboard has no {wanted!r} panel"
    assert {"ray_promptmux_requests_total", "ray_promptmux_request_latency_seconds_bucket",
            "ray_promptmux_batch_size_sum", "ray_promptmux_batch_distinct_tasks_sum",
            "ray_promptmux_prompt_cache_hits_total", "ray_promptmux_queue_depth"} <= used


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_grafana_configmap_carries_the_dashboard_json(kustomization):
    configmap = next(o for o in objects(kustomization) if o["kind"] == "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][GRAFANA_JSON.name]) == json.loads(GRAFANA_JSON.read_text())

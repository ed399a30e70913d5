"""Offline checks of deploy/: the Kubernetes manifests users apply and the images they build.

No cluster, no kustomize binary and no docker engine: the overlays are rendered by
deploy/render.py, core kinds are validated with kubernetes-validate's bundled schemas, the
RayService against KubeRay's CRD schema (shared/k8s-crds), the Serve config with Ray's own
ServeDeploySchema, and the Dockerfiles are read as text against pyproject.toml.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import importlib.util
import pickle
import posixpath
import re
import shlex
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUSTOMIZE_ROOT = DEPLOY / "kubernetes"
CRD_DIR = REPO.parent / "shared" / "k8s-crds"
SERVE_YAML = REPO / "serving" / "configs" / "serve.yaml"
DOCKERFILES = {"cuda": DEPLOY / "docker" / "Dockerfile.cuda", "cpu": DEPLOY / "docker" / "Dockerfile.cpu"}
CONSTRAINTS = DEPLOY / "docker" / "constraints.txt"

OVERLAYS = ["cpu-demo", "gpu-t5-xxl"]
KUSTOMIZATIONS = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
# Oldest Kubernetes the manifests must be valid for.
KUBERNETES_VERSION = "1.30"
RAY_VERSION = "2.60.0"
TORCH_VERSION = "2.13.0"
# The demo tenant's token in the cpu-demo overlay; deploy/README.md publishes it.
DEMO_TOKEN = "pmx-demo-not-for-production"

# Modules the serving layer is still adding; a check that needs one skips until it lands.
PENDING_MODULES = {
    "promptmux.serving.app", "promptmux.serving.proto_build", "promptmux.serving.cli", "promptmux.serving.serve_cli",
}


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


def skip_if_pending(module: str) -> None:
    if module in PENDING_MODULES and not module_file(module).exists():
        pytest.skip(f"{module} ({module_file(module).relative_to(REPO)}) is not written yet")


# ---------------------------------------------------------------------------------------
# The renderer


def test_renderer_builds_the_expected_objects():
    expected = {("Secret", "promptmux-api-keys"), ("PersistentVolumeClaim", "promptmux-prompts"),
                ("RayService", "promptmux"), ("PodMonitor", "promptmux-ray")}
    assert {(o["kind"], o["metadata"]["name"]) for o in objects("base")} == expected
    assert {(o["kind"], o["metadata"]["name"]) for o in objects("overlays/cpu-demo")} == expected
    assert {(o["kind"], o["metadata"]["name"]) for o in objects("overlays/gpu-t5-xxl")} == expected | {
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
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objs = objects(kustomization)
    core = [o for o in objs if o["kind"] in {"Secret", "PersistentVolumeClaim"}]
    assert core, "the render lost its core objects"
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
def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod(kustomization):
    objs = objects(kustomization)
    monitor = only(objs, "PodMonitor")
    jsonschema.Draft202012Validator(PODMONITOR_SCHEMA).validate(monitor)
    selector = monitor["spec"]["selector"]["matchLabels"]
    rayservice = only(objs, "RayService")
    for role, template in ray_pod_templates(rayservice).items():
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{role} pod labels {labels} miss the PodMonitor selector {selector}"
        ports = named_ports(ray_container(template))
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, f"{role} has no port named {endpoint['port']!r}"
            assert ports[endpoint["port"]] == int(rayservice_start_params(rayservice, role)["metrics-export-port"])


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
    assert app["import_path"] == "promptmux.serving.app:build_app"
    assert app["route_prefix"] == "/promptmux"
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        "promptmux.serving.proxy_status.add_PromptmuxServicer_to_server"]
    assert config["grpc_options"]["port"] == 9000
    assert config["http_options"]["port"] == 8000
    assert set(app["args"]) <= {"model", "store", "engine", "serving"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_args_build_a_valid_promptmux_config(kustomization):
    args = the_app(serve_config(kustomization))["args"]
    if importlib.util.find_spec("promptmux.serving.serving_config") is None:
        from promptmux.serving.config import PromptmuxConfig

        PromptmuxConfig.from_dict({k: v for k, v in args.items() if k != "serving"})
        pytest.skip("promptmux.serving.serving_config is not written yet: the `serving` section is unchecked")
    from promptmux.serving.serving_config import AppConfig

    # The same parse build_app does: a typo here fails the deploy.
    config = AppConfig.from_args(args)
    assert config.serving.api_keys_file == args["serving"]["api_keys_file"]


def test_serve_import_path_and_servicer_function_import():
    module_name, _, attribute = the_app(serve_config("base"))["import_path"].partition(":")
    skip_if_pending(module_name)
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
    if importlib.util.find_spec("promptmux.serving.proto_gen") is None:
        pytest.skip("protos are not generated in this checkout (python -m promptmux.serving.proto_build)")
    assert callable(getattr(importlib.import_module(servicer_module), function))


def test_grpc_messages_survive_the_pickling_between_proxy_and_replica():
    # Ray Serve's gRPC proxy pickles each request to hand it to a replica (and the reply
    # back), by module path: generated classes must name an importable module.
    if importlib.util.find_spec("promptmux.serving.proto_gen") is None:
        pytest.skip("protos are not generated in this checkout (python -m promptmux.serving.proto_build)")
    pb2 = importlib.import_module("promptmux.serving.proto_gen.promptmux_pb2")
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
    skip_if_pending("promptmux.serving.app")
    from promptmux.serving.app import build_app

    app = the_app(serve_config(kustomization))
    built = build_app(app["args"])
    assert [d["name"] for d in app["deployments"]] == [built._bound_deployment.name]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_agrees_with_the_projects_serve_yaml(kustomization):
    if not SERVE_YAML.exists():
        pytest.skip(f"{SERVE_YAML.relative_to(REPO)} is not written yet")
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
def test_ports_agree_across_containers_serve_config_and_serve_service(kustomization):
    config = serve_config(kustomization)
    rayservice = only(objects(kustomization), "RayService")
    expected = {"serve": config["http_options"]["port"], "serve-grpc": config["grpc_options"]["port"]}
    for role, template in ray_pod_templates(rayservice).items():
        ports = named_ports(ray_container(template))
        for name, number in expected.items():
            assert ports.get(name) == number, f"{role}: port {name!r} is {ports.get(name)}, Serve uses {number}"
    # KubeRay (>= 1.6) builds promptmux-serve-svc from the head container's ports named
    # `serve` or `serve-*`: both HTTP and gRPC must be among them, and nothing else.
    head_ports = named_ports(ray_container(ray_pod_templates(rayservice)["head"]))
    serve_service = {n: p for n, p in head_ports.items() if n == "serve" or n.startswith("serve-")}
    assert serve_service == expected


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
def test_api_keys_secret_and_prompt_store_reach_every_ray_pod(kustomization):
    objs = objects(kustomization)
    args = the_app(serve_config(kustomization))["args"]
    secret = only(objs, "Secret")
    claims = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    keys_file = args["serving"]["api_keys_file"]
    assert keys_file == "/etc/promptmux/api-keys/keys.yaml"
    assert args["store"]["root"] == "/var/lib/promptmux/prompts"
    for role, template in ray_pod_templates(only(objs, "RayService")).items():
        container = ray_container(template)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("PROMPTMUX_API_KEYS_FILE") == keys_file, role
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"].rstrip("/"): volumes[m["name"]] for m in container["volumeMounts"]}

        keys_volume = mounts[posixpath.dirname(keys_file)]
        assert keys_volume["secret"]["secretName"] == secret["metadata"]["name"], role
        assert posixpath.basename(keys_file) in secret["stringData"], role

        store_volume = mounts[args["store"]["root"]]
        claim = claims[store_volume["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica shares the prompt store"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_api_keys_secret_follows_the_contract_format(kustomization):
    text = only(objects(kustomization), "Secret")["stringData"]["keys.yaml"]
    keys = yaml.safe_load(text)["keys"]
    assert isinstance(keys, list)
    for entry in keys:
        assert set(entry) == {"tenant", "sha256", "admin"}, entry
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), "sha256 is the hex digest of the token, never the token"
        assert isinstance(entry["admin"], bool) and isinstance(entry["tenant"], str) and entry["tenant"]
    assert len({e["tenant"] for e in keys}) == len(keys), "one entry per tenant"
    if importlib.util.find_spec("promptmux.serving.auth") is not None:
        from promptmux.serving.auth import parse_key_file

        # What a replica reads from the mounted file.
        assert {p.tenant for p in parse_key_file(text, "keys.yaml").values()} == {e["tenant"] for e in keys}


def test_demo_key_is_the_token_the_readme_publishes():
    keys = yaml.safe_load(only(objects("overlays/cpu-demo"), "Secret")["stringData"]["keys.yaml"])["keys"]
    assert [k["sha256"] for k in keys] == [hashlib.sha256(DEMO_TOKEN.encode()).hexdigest()]
    assert DEMO_TOKEN in (DEPLOY / "README.md").read_text()
    assert only(objects("overlays/gpu-t5-xxl"), "Secret")["stringData"]["keys.yaml"].strip() == "keys: []", \
        "the published demo key must stay out of the GPU deployment"


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


def test_gpu_t5_xxl_loads_the_checkpoint_from_the_models_volume():
    objs = objects("overlays/gpu-t5-xxl")
    model = the_app(serve_config("overlays/gpu-t5-xxl"))["args"]["model"]
    assert model["source"] == "/models/t5-xxl"
    assert model["dtype"] == "bfloat16", "T5 overflows in float16"
    assert model["device_map"] == "auto"
    assert model["quantization"] in {"none", "8bit"}
    claims = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    for role, template in ray_pod_templates(only(objs, "RayService")).items():
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
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
        assert scaling["target_ongoing_requests"] >= max_batch, "replicas would scale out before a batch fills"
        max_ongoing = effective_deployment_options(app["args"], deployment)["max_ongoing_requests"]
        if max_ongoing is not None:
            assert max_ongoing >= max_batch, "or batches never fill (DESIGN.md)"
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
    """The Serve config's options over the application's own defaults (serving/app.py)."""
    options = {"max_ongoing_requests": None}
    if importlib.util.find_spec("promptmux.serving.app") is not None:
        from promptmux.serving.app import deployment_defaults
        from promptmux.serving.serving_config import AppConfig

        options.update(deployment_defaults(AppConfig.from_args(args)))
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
    assert modules == ["promptmux.serving.proto_build"]
    cmd = yaml.safe_load(next(args for instruction, args in instructions if instruction == "CMD"))
    scripts = pyproject()["project"]["scripts"]
    assert cmd[0] in scripts, f"CMD runs {cmd[0]!r}, which pyproject.toml's [project.scripts] does not define"
    entry_module = scripts[cmd[0]].split(":")[0]
    missing = [m for m in modules + [entry_module] if not module_file(m).exists()]
    assert set(missing) <= PENDING_MODULES, f"the image runs {missing}, which do not exist in the repository"
    if missing:
        pytest.skip(f"{missing} not written yet")
    from promptmux.serving.cli import build_parser

    subcommands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if cmd[1] not in subcommands:
        skip_if_pending("promptmux.serving.serve_cli")
    assert cmd[1] in subcommands, f"CMD runs `promptmux {cmd[1]}`, which the CLI does not offer: {sorted(subcommands)}"


def test_run_time_files_are_package_data_so_a_non_editable_install_ships_them():
    # The images install the project as a wheel: a file under serving/assets or
    # serving/configs that no package-data pattern matches is missing in every pod.
    package_data = pyproject()["tool"]["setuptools"]["package-data"]["promptmux.serving"]
    serving = REPO / "serving"
    shipped = {path for pattern in package_data for path in serving.glob(pattern) if path.is_file()}
    needed = {path for folder in ("assets", "configs") for path in (serving / folder).rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    needed.add(serving / "promptmux.proto")
    unshipped = sorted(str(path.relative_to(REPO)) for path in needed - shipped)
    assert not unshipped, (
        f"{unshipped} would be left out of the image; add a matching pattern (e.g. 'assets/**/*') to "
        f"pyproject.toml's [tool.setuptools.package-data] \"promptmux.serving\"")

"""The Kubernetes and KServe manifests under deploy/, checked offline.

- Core kinds against the Kubernetes API schemas that kubernetes-validate ships, strict
  (an unknown field is an error), for the oldest and the newest version named below.
- KServe kinds against the OpenAPI schemas of KServe's CRDs vendored in
  deploy/kserve/schemas/ (README.md there names the source), with jsonschema, plus what
  the API server adds: `metadata` is an ObjectMeta, and a field the schema does not
  declare is an error (as `kubectl apply --validate=strict` reports it).
- What the manifests say about tidegate agrees with the Dockerfile and the CLI: the
  command, every option, the ports, the user, the writable paths, the auth file, the
  probes' token, the grace period against the drain.
- The probes' commands and the example auth Secret work against a real server.

Each check returns the problems it finds, and is shown to find them in a broken copy.
"""

import copy
import functools
import inspect
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

import tidegate
from tests.conftest import ROOT, LiveServer
from tidegate.app import GRPC_GRACE_S
from tidegate.auth import Role, hash_token, parse_auth_file
from tidegate.cli import main
from tidegate.server import serve

DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "kserve" / "schemas"
# The oldest Kubernetes these manifests are for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntime-v1alpha1",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-v1beta1.partial",
}
Manifest = dict[str, Any]


def _documents() -> list[tuple[str, Manifest]]:
    """(file:kind/name, document) for every YAML document under deploy/kubernetes and
    deploy/kserve, the vendored schemas aside."""
    found = []
    for folder in ("kubernetes", "kserve"):
        for path in sorted((DEPLOY / folder).glob("*.yaml")):
            for document in yaml.safe_load_all(path.read_text()):
                name = (
                    f"{path.relative_to(DEPLOY)}:{document['kind']}/{document['metadata']['name']}"
                )
                found.append((name, document))
    return found


DOCUMENTS = _documents()
CORE = [(name, doc) for name, doc in DOCUMENTS if not doc["apiVersion"].startswith("serving.")]
KSERVE = [(name, doc) for name, doc in DOCUMENTS if doc["apiVersion"].startswith("serving.")]


def _one(kind: str, folder: str) -> Manifest:
    (document,) = [
        doc for name, doc in DOCUMENTS if name.startswith(folder) and doc["kind"] == kind
    ]
    return document


def test_every_kind_asked_for_is_there():
    kinds = {(name.split("/")[0], doc["kind"]) for name, doc in DOCUMENTS}
    assert kinds == {
        ("kubernetes", "Deployment"),
        ("kubernetes", "Service"),
        ("kubernetes", "HorizontalPodAutoscaler"),
        ("kubernetes", "PodDisruptionBudget"),
        ("kubernetes", "Secret"),
        ("kubernetes", "PersistentVolumeClaim"),
        ("kserve", "ClusterServingRuntime"),
        ("kserve", "InferenceService"),
        ("kserve", "Secret"),
    }


# -- core kinds: kubernetes-validate --------------------------------------------------


def _core_problems(document: Manifest, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "document"), CORE, ids=[name for name, _ in CORE])
def test_core_manifests_match_the_kubernetes_schemas(name: str, document: Manifest, version: str):
    assert _core_problems(document, version) == []


def test_the_core_validator_rejects_a_broken_manifest():
    deployment = copy.deepcopy(_one("Deployment", "kubernetes"))
    deployment["spec"]["replica"] = 2  # a typo of replicas
    assert _core_problems(deployment, KUBERNETES_VERSIONS[0])
    deployment = copy.deepcopy(_one("Deployment", "kubernetes"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "90"
    assert _core_problems(deployment, KUBERNETES_VERSIONS[0])


# -- KServe kinds: the vendored CRD schemas ---------------------------------------------


@functools.cache
def _kserve_schema(api_version: str, kind: str) -> dict[str, Any]:
    stem = KSERVE_SCHEMAS[(api_version, kind)]
    schema: dict[str, Any] = yaml.safe_load((SCHEMAS / f"{stem}.yaml").read_text())
    return schema


@functools.cache
def _object_meta_schema() -> dict[str, Any]:
    """ObjectMeta (strict) from kubernetes-validate's definitions, $refs resolved there."""
    folder = f"v{KUBERNETES_VERSIONS[0]}.0-local-strict"
    files = kubernetes_validate.utils.importlib_resources.files("kubernetes_validate")
    definitions = json.loads(
        files.joinpath("kubernetes-json-schema", folder, "_definitions.json").read_text()
    )
    return {
        **definitions["$defs"]["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"],
        "$defs": definitions["$defs"],
    }


def _undeclared(instance: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    """Fields the structural schema does not declare: the API server prunes them, and
    strict field validation reports them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(instance, dict):
        declared = schema.get("properties", {})
        rest = schema.get("additionalProperties")
        for key, value in instance.items():
            if key in declared:
                yield from _undeclared(value, declared[key], f"{path}.{key}")
            elif isinstance(rest, dict):
                yield from _undeclared(value, rest, f"{path}.{key}")
            else:
                yield f"{path}.{key}"
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(instance):
            yield from _undeclared(item, schema["items"], f"{path}[{index}]")


def _kserve_problems(document: Manifest) -> list[str]:
    schema = _kserve_schema(document["apiVersion"], document["kind"])
    validator = jsonschema.Draft4Validator(schema)
    problems = [
        f"{'.'.join(map(str, error.path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]
    problems += [
        f"metadata.{'.'.join(map(str, error.path))}: {error.message}"
        for error in jsonschema.Draft202012Validator(_object_meta_schema()).iter_errors(
            document["metadata"]
        )
    ]
    body = {key: value for key, value in document.items() if key != "metadata"}
    problems += [f"{field[1:]}: not in the schema" for field in _undeclared(body, schema, "")]
    return problems


@pytest.mark.parametrize(("name", "document"), KSERVE, ids=[name for name, _ in KSERVE])
def test_kserve_manifests_match_the_crd_schemas(name: str, document: Manifest):
    assert _kserve_problems(document) == []


@pytest.mark.parametrize(
    "breakage",
    [
        # protocolVersions is a list
        lambda runtime, service: runtime["spec"].update(protocolVersions="v2"),
        # a typo in a container field: undeclared
        lambda runtime, service: runtime["spec"]["containers"][0].update(arg=["serve"]),
        # priority is at least 1
        lambda runtime, service: runtime["spec"]["supportedModelFormats"][0].update(priority=0),
        # metadata is an ObjectMeta
        lambda runtime, service: runtime["metadata"].update(labels=["tidegate"]),
        # an InferenceService needs a predictor
        lambda runtime, service: service["spec"].pop("predictor"),
        # canaryTrafficPercent is an integer
        lambda runtime, service: service["spec"]["predictor"].update(canaryTrafficPercent="10"),
        # a field of a part the vendored schema leaves out is reported, not let through
        lambda runtime, service: service["spec"].update(transformer={"containers": []}),
    ],
    ids=["list", "undeclared", "minimum", "metadata", "required", "integer", "left-out"],
)
def test_the_kserve_validator_rejects_broken_manifests(breakage):
    runtime = copy.deepcopy(_one("ClusterServingRuntime", "kserve"))
    service = copy.deepcopy(_one("InferenceService", "kserve"))
    breakage(runtime, service)
    assert _kserve_problems(runtime) + _kserve_problems(service)


def test_the_vendored_schemas_name_their_source():
    readme = (SCHEMAS / "README.md").read_text()
    for stem in KSERVE_SCHEMAS.values():
        header = (SCHEMAS / f"{stem}.yaml").read_text().split("\nproperties:", 1)[0]
        commit = re.search(r"at commit\n?# ?([0-9a-f]{40})", header)
        assert commit is not None, stem
        assert "repository kserve/kserve" in header
        assert f"`{stem}.yaml`" in readme
        assert commit.group(1) in readme


def test_the_inference_service_uses_the_runtime():
    runtime = _one("ClusterServingRuntime", "kserve")
    model = _one("InferenceService", "kserve")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = runtime["spec"]["supportedModelFormats"]
    assert [f for f in formats if f["name"] == model["modelFormat"]["name"] == "onnx"]
    assert formats[0]["autoSelect"] is True
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    # KServe merges the InferenceService's model fields into the container of this name.
    assert runtime["spec"]["containers"][0]["name"] == "kserve-container"
    assert model["storageUri"]


# -- agreement with the Dockerfile and the CLI ------------------------------------------


def _dockerfile() -> dict[str, Any]:
    text = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
    expose = re.search(r"^EXPOSE (.*)$", text, re.MULTILINE)
    uid = re.search(r"useradd .*--uid (\d+) tidegate", text)
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", text)
    assert cmd is not None
    assert expose is not None
    assert uid is not None
    assert cache is not None
    return {
        "cmd": json.loads(cmd.group(1)),
        "ports": {int(port) for port in expose.group(1).split()},
        "uid": int(uid.group(1)),
        "numba_cache": cache.group(1),
    }


def _serve_options() -> dict[str, click.Parameter]:
    return {
        opt: param
        for param in main.commands["serve"].params
        for opt in [*param.opts, *param.secondary_opts]
        if opt.startswith("--")
    }


def _options(args: list[str]) -> dict[str, str | None]:
    """`--option value` pairs of a `tidegate serve` argument list (flags map to None)."""
    known = _serve_options()
    options: dict[str, str | None] = {}
    words = iter(args)
    for word in words:
        if word.startswith("--"):
            param = known.get(word)
            takes_value = isinstance(param, click.Option) and not param.is_flag
            options[word] = next(words, None) if takes_value else None
    return options


def _cli_problems(args: list[str]) -> list[str]:
    """What `tidegate serve` would refuse in an argument list: unknown options, values
    of the wrong type (paths aside: they exist only in the container), `auto` workers."""
    problems = []
    known = _serve_options()
    for option, value in _options(args).items():
        param = known.get(option)
        if param is None:
            problems.append(f"{option}: not an option of tidegate serve")
            continue
        if value is not None and not isinstance(param.type, click.Path):
            try:
                param.type.convert(value, param, None)
            except click.BadParameter as exc:
                problems.append(f"{option} {value}: {exc.message}")
    workers = _options(args).get("--workers", "1")
    if not (workers or "").isdigit():
        problems.append(f"--workers {workers}: a pod counts the node's cores; give a number")
    return problems


def _tidegate_pods() -> list[tuple[str, Manifest, Manifest]]:
    """(where, pod spec, tidegate's container) of the Deployment and the runtime."""
    deployment = _one("Deployment", "kubernetes")["spec"]["template"]["spec"]
    runtime = _one("ClusterServingRuntime", "kserve")["spec"]
    return [
        ("kubernetes", deployment, deployment["containers"][0]),
        ("kserve", runtime, runtime["containers"][0]),
    ]


PODS = _tidegate_pods()
PORTS = {"kubernetes": (8000, 8001), "kserve": (8080, 8081)}  # KServe's: HTTP 8080, gRPC 8081


@pytest.mark.parametrize(("where", "pod", "container"), PODS, ids=[where for where, *_ in PODS])
def test_the_command_is_the_images_with_options_that_exist(where, pod, container):
    docker = _dockerfile()
    args = container["args"]
    assert "command" not in container  # the image has no ENTRYPOINT: args replace its CMD
    assert args[:2] == docker["cmd"][:2] == ["tidegate", "serve"]
    assert _cli_problems(args) == []
    options = _options(args)
    cmd = _options(docker["cmd"])
    # Bound beyond loopback, so with the auth file the image expects, never without one.
    assert options["--host"] == cmd["--host"] == "0.0.0.0"
    assert options["--auth-file"] == cmd["--auth-file"]
    assert "--insecure-no-auth" not in args
    http, grpc = PORTS[where]
    assert (options["--port"], options["--grpc-port"]) == (str(http), str(grpc))
    if where == "kubernetes":
        assert {http, grpc} == docker["ports"]  # the Dockerfile's EXPOSE
        assert args[2] == docker["cmd"][2]  # the repository baked into the image
    else:
        assert args[2] == "/mnt/models"  # where KServe's storage initializer puts it
    assert tidegate.__version__ == container["image"].rpartition(":")[2]


def test_the_cli_check_rejects_what_serve_would():
    assert _cli_problems(["tidegate", "serve", "m", "--graceful-timeout", "5"])
    assert _cli_problems(["tidegate", "serve", "m", "--port", "http"])
    assert _cli_problems(["tidegate", "serve", "m", "--log-format", "yaml"])
    assert _cli_problems(["tidegate", "serve", "m", "--workers", "auto"])


@pytest.mark.parametrize(("where", "pod", "container"), PODS, ids=[where for where, *_ in PODS])
def test_the_ports_are_declared_and_probed(where, pod, container):
    http, grpc = PORTS[where]
    declared = {port["containerPort"] for port in container["ports"]}
    # Knative routes one port per container: gRPC is declared by an InferenceService
    # that wants it (docs/deployment.md).
    assert declared == ({http} if where == "kserve" else {http, grpc})
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"]
        url = re.search(r'"(http://[^"]+)"', command[2])
        assert url is not None
        assert url.group(1).startswith(f"http://127.0.0.1:{http}/v2/health/")
        assert "TIDEGATE_HEALTH_TOKEN" in command[2]


def _mounts(pod: Manifest, container: Manifest) -> dict[str, tuple[Manifest, Manifest]]:
    """mountPath -> (volume mount, volume)."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


@pytest.mark.parametrize(("where", "pod", "container"), PODS, ids=[where for where, *_ in PODS])
def test_it_runs_unprivileged_on_a_read_only_root(where, pod, container):
    docker = _dockerfile()
    context = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == docker["uid"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # Everything tidegate writes is on a volume.
    mounts = _mounts(pod, container)
    writable = {path for path, (mount, _) in mounts.items() if not mount.get("readOnly")}
    state_dir = _options(container["args"])["--state-dir"]
    assert {state_dir, docker["numba_cache"], "/tmp"} <= writable
    assert "emptyDir" in mounts[docker["numba_cache"]][1]
    if where == "kubernetes":
        assert "persistentVolumeClaim" in mounts[state_dir][1]
    else:
        assert "emptyDir" in mounts[state_dir][1]


@pytest.mark.parametrize(("where", "pod", "container"), PODS, ids=[where for where, *_ in PODS])
def test_the_auth_file_and_the_probe_token_come_from_the_secret(where, pod, container):
    secret = _one("Secret", where)
    auth_file = Path(_options(container["args"])["--auth-file"] or "")
    mount, volume = _mounts(pod, container)[str(auth_file.parent)]
    assert mount["readOnly"] is True
    assert "subPath" not in mount  # a subPath mount never sees a rotated Secret
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (item,) = volume["secret"]["items"]
    assert item["path"] == auth_file.name
    assert item["key"] in secret["stringData"]
    (env,) = [e for e in container["env"] if e["name"] == "TIDEGATE_HEALTH_TOKEN"]
    reference = env["valueFrom"]["secretKeyRef"]
    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in secret["stringData"]


def _auth(secret: Manifest, tmp_path: Path) -> tuple[Path, str]:
    """The Secret's auth file, written out, and its probe token."""
    path = tmp_path / "auth.toml"
    path.write_text(secret["stringData"]["auth.toml"])
    return path, secret["stringData"]["probe-token"]


def test_the_secrets_probe_token_is_a_reader_of_its_auth_file(tmp_path: Path):
    kubernetes, kserve = _one("Secret", "kubernetes"), _one("Secret", "kserve")
    assert kubernetes["stringData"] == kserve["stringData"]
    path, token = _auth(kubernetes, tmp_path)
    principals = parse_auth_file(path)
    assert Role.READER in principals[hash_token(token)].roles
    # No well-known token may do more than read.
    assert [p.roles for p in principals.values()] == [frozenset({Role.READER})]
    assert tomllib.loads(path.read_text())["tokens"]


def _drain_seconds() -> float:
    """What a SIGTERM may take: uvicorn's graceful timeout for HTTP (server.serve's
    default), then the lifespan's shutdown, which gives gRPC calls GRPC_GRACE_S."""
    graceful = inspect.signature(serve).parameters["graceful_timeout"].default
    return float(graceful) + GRPC_GRACE_S


def test_the_grace_period_outlasts_the_drain():
    pod = _one("Deployment", "kubernetes")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pause[1]) + _drain_seconds()


def test_the_kernel_cache_is_seeded_from_the_same_image():
    docker = _dockerfile()
    pod = _one("Deployment", "kubernetes")["spec"]["template"]["spec"]
    (seed,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert seed["image"] == container["image"]
    source, target = seed["command"][-2:]
    assert source.rstrip("/.") == docker["numba_cache"]
    (mount,) = seed["volumeMounts"]
    assert mount["mountPath"].rstrip("/") == target.rstrip("/")
    assert _mounts(pod, container)[docker["numba_cache"]][0]["name"] == mount["name"]


# -- the pieces of the Kubernetes deployment fit together -------------------------------


def test_the_services_the_autoscaler_and_the_budget_select_the_pods():
    deployment = _one("Deployment", "kubernetes")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    named_ports = {
        port["name"]: port["containerPort"]
        for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    services = {doc["metadata"]["name"]: doc["spec"] for _, doc in CORE if doc["kind"] == "Service"}
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
        for port in spec["ports"]:
            assert named_ports[port["targetPort"]] == port["port"]
    assert {p["port"] for p in services["tidegate"]["ports"]} == {8000, 8001}
    replicas = services["tidegate-replicas"]
    assert replicas["clusterIP"] == "None"  # headless: one DNS record per replica
    assert replicas["publishNotReadyAddresses"] is True
    hpa = _one("HorizontalPodAutoscaler", "kubernetes")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    pdb = _one("PodDisruptionBudget", "kubernetes")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["minReplicas"] > pdb["maxUnavailable"]


def test_the_replicas_share_one_state_volume():
    pod = _one("Deployment", "kubernetes")["spec"]["template"]["spec"]
    claim = _one("PersistentVolumeClaim", "kubernetes")
    state_dir = _options(pod["containers"][0]["args"])["--state-dir"]
    volume = _mounts(pod, pod["containers"][0])[state_dir][1]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# -- the probes against a real server ----------------------------------------------------


def _probe(container: Manifest, probe: str, port: int, token: str) -> int:
    """Runs a probe's command against a server on `port`; its exit status."""
    python, flag, script = container[probe]["exec"]["command"]
    assert (python, flag) == ("python", "-c")
    script = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", script)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={"TIDEGATE_HEALTH_TOKEN": token},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode


def test_the_probes_pass_with_the_secrets_token_and_fail_without(
    tmp_path: Path, models_dir: Path, start_server: type[LiveServer]
):
    auth_file, token = _auth(_one("Secret", "kubernetes"), tmp_path)
    live = start_server(models_dir, "--auth-file", str(auth_file), probe_token=token)
    for _, _, container in PODS:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert _probe(container, probe, live.port, token) == 0, probe
            assert _probe(container, probe, live.port, "not-" + token) != 0, probe


def test_the_docs_the_manifests_point_to_exist():
    for path in sorted(DEPLOY.glob("kube*/*.yaml")) + sorted(DEPLOY.glob("kserve/*.yaml")):
        for page, anchor in re.findall(r"(docs/[\w-]+\.md)(?:#([\w-]+))?", path.read_text()):
            text = (ROOT / page).read_text()
            headings = re.findall(r"^#+ (.*)$", text, re.MULTILINE)
            slugs = {
                re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).replace(" ", "-")
                for h in headings
            }
            assert not anchor or anchor in slugs, f"{path.name}: {page}#{anchor}"

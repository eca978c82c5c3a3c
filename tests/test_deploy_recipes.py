"""The deploy/ recipes, checked as far as this machine can run them.

Docker, Kubernetes and Envoy are not available here, so their files are
checked for what can go wrong without them: every rules file passes ``sluice
check`` (with only the environment the recipe documents), every YAML file
parses, every file a recipe points at exists, and the numbers that must agree
across files (ports, names, paths, prefixes) do. The Envoy recipe's decision
route is exercised with requests shaped as Envoy's ext_authz HTTP service sends
them, and the headers Sluice answers with are matched against the header lists
in envoy.yaml. NGINX runs for real in ``test_nginx_functional.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from proxy.config import Config, load
from tests.inproc import running
from tests.proc import REPO, free_port, run_sluice

DEPLOY = REPO / "deploy"
RULES_FILES = sorted(DEPLOY.rglob("rules.yaml"))
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
# The only variables a recipe needs set (everything else has a default).
RECIPE_ENV = {"SLUICE_ADMIN_TOKEN": "placeholder-admin-token-for-tests"}
V3_TYPE = re.compile(r"^type\.googleapis\.com/envoy\.[a-z0-9_.]+\.v3\.[A-Za-z]+$")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_rules(path: Path, **env: str) -> Config:
    return load(path, env={**RECIPE_ENV, **env})


def listen_port(text: str) -> int:
    return int(text.rsplit(":", 1)[1])


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a nested YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def test_recipes_exist() -> None:
    for name in (
        "nginx/nginx.conf",
        "nginx/rules.yaml",
        "nginx/README.md",
        "envoy/envoy.yaml",
        "envoy/rules.yaml",
        "envoy/README.md",
        "compose/docker-compose.yml",
        "compose/prometheus.yml",
        "compose/rules.yaml",
        "compose/README.md",
        "kubernetes/kustomization.yaml",
        "kubernetes/app-with-sluice.yaml",
        "kubernetes/rules.yaml",
        "kubernetes/README.md",
    ):
        assert (DEPLOY / name).is_file(), name


# ---------------------------------------------------------------- every file


def test_sluice_check_passes_on_every_rules_file_under_deploy() -> None:
    """The real command, with nothing in the environment but PATH and the admin token."""
    assert len(RULES_FILES) >= 5, RULES_FILES
    env = {"PATH": os.environ.get("PATH", ""), **RECIPE_ENV}
    result = run_sluice(["check", *map(rel, RULES_FILES)], cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    for path in RULES_FILES:
        assert f"{rel(path)}: OK" in result.stdout


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_file_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{rel(path)} is empty"
    assert all(isinstance(d, dict) for d in documents)


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_references_existing_files(compose: dict[str, Any]) -> None:
    base = DEPLOY / "compose"
    services = compose["services"]
    assert {"sluice", "redis", "demo", "prometheus"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = base / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (context / dockerfile).is_file(), (name, context)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (base / source).resolve().exists(), (name, source)
        for env_file in service.get("env_file", []):
            assert (base / env_file).is_file(), (name, env_file)


def test_compose_pieces_agree(compose: dict[str, Any]) -> None:
    base = DEPLOY / "compose"
    services = compose["services"]
    rules = load_rules(base / "rules.yaml")
    dockerfile = (REPO / "Dockerfile").read_text()
    # Sluice reads its rules where the image expects them.
    assert "/etc/sluice/rules.yaml" in dockerfile
    assert "./rules.yaml:/etc/sluice/rules.yaml:ro" in services["sluice"]["volumes"]
    published = {p.split(":")[-1] for p in services["sluice"]["ports"]}
    assert published == {str(rules.listen.port), str(rules.admin.listen.port)}
    assert rules.listen.host == rules.admin.listen.host == "0.0.0.0"  # reachable in a container
    # Storage is the compose Redis.
    assert urlsplit(rules.storage.url).hostname == "redis"
    # The demo API shares Sluice's network namespace and listens where rules.yaml points.
    demo = services["demo"]
    assert demo["network_mode"] == "service:sluice"
    entry = demo["entrypoint"]
    assert entry[:4] == ["python", "-m", "proxy.demo", "--upstream-only"]
    upstream = urlsplit(rules.upstreams["demo"].url)
    assert (upstream.hostname, upstream.port) == (
        "127.0.0.1",
        int(entry[entry.index("--upstream-port") + 1]),
    )
    demo_help = _python_help("proxy.demo")
    assert "--upstream-only" in demo_help and "--upstream-port" in demo_help
    # Prometheus scrapes Sluice's admin listener.
    prom = yaml.safe_load((base / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "sluice"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"sluice:{rules.admin.listen.port}"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def _python_help(module: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


# ---------------------------------------------------------------- kubernetes


def _k8s_documents() -> list[dict[str, Any]]:
    base = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        path = base / resource
        assert path.is_file(), resource
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in docs])
    return found[0]


def test_kubernetes_sidecar_recipe_agrees_with_its_rules() -> None:
    base = DEPLOY / "kubernetes"
    docs = _k8s_documents()
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["rules.yaml"]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    rules = load_rules(base / "rules.yaml")

    deployment = _one(docs, "Deployment", "api")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] == rules.storage.expected_instances
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    sluice, app = containers["sluice"], containers["app"]

    # The rules come from the generated ConfigMap, mounted as a directory (a
    # subPath mount would never see an update, so no reload would happen).
    config_path = sluice["args"][sluice["args"].index("-c") + 1]
    mount_dir, file_name = config_path.rsplit("/", 1)
    assert file_name == "rules.yaml"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in sluice["volumeMounts"] if m["mountPath"] == mount_dir]
    assert "subPath" not in mount
    assert volumes[mount["name"]]["configMap"]["name"] == generator["name"]

    ports = {p["name"]: p["containerPort"] for p in sluice["ports"]}
    assert ports == {"http": rules.listen.port, "admin": rules.admin.listen.port}
    assert rules.listen.host == rules.admin.listen.host == "0.0.0.0"
    ready, live = sluice["readinessProbe"]["httpGet"], sluice["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/readyz", "admin")
    assert (live["path"], live["port"]) == ("/healthz", "admin")
    for container in (sluice, app):
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests), container["name"]
    env = {e["name"]: e for e in sluice["env"]}
    assert env["SLUICE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    # The application is the sidecar's upstream, on the pod's loopback.
    upstream = urlsplit(rules.upstreams["app"].url)
    assert upstream.hostname == "127.0.0.1"
    assert str(upstream.port) == app["command"][app["command"].index("--upstream-port") + 1]
    # The image's user, by number (runAsNonRoot cannot check a name).
    uid = re.search(r"--uid (\d+)", (REPO / "Dockerfile").read_text())
    assert uid is not None
    assert sluice["securityContext"]["runAsUser"] == int(uid.group(1))
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > rules.server.shutdown_grace + 5  # preStop sleep + drain

    service = _one(docs, "Service", "api")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]  # never the app

    monitor = _one(docs, "PodMonitor", "api-sluice")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("admin", "/metrics")

    redis_service = _one(docs, "Service", "redis")
    storage = urlsplit(env["SLUICE_STORAGE_URL"]["value"])
    assert storage.hostname == redis_service["metadata"]["name"]
    assert storage.port == redis_service["spec"]["ports"][0]["port"]


# ---------------------------------------------------------------- envoy


@pytest.fixture(scope="module")
def envoy() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _hcm(envoy: dict[str, Any]) -> dict[str, Any]:
    (listener,) = envoy["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = [
        f for f in chain["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    config = hcm["typed_config"]
    assert config["@type"] == (
        "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager"
    )
    return dict(config)


def _ext_authz(envoy: dict[str, Any]) -> dict[str, Any]:
    filters = _hcm(envoy)["http_filters"]
    (authz,) = [f for f in filters if f["name"] == "envoy.filters.http.ext_authz"]
    return dict(authz["typed_config"])


def _envoy_decide_route(**env: str) -> tuple[Config, Any]:
    rules = load_rules(DEPLOY / "envoy" / "rules.yaml", **env)
    (route,) = [r for r in rules.routes if r.kind == "decide"]
    return rules, route


def test_envoy_filter_chain_and_v3_types(envoy: dict[str, Any]) -> None:
    hcm = _hcm(envoy)
    filters = hcm["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",  # the router must come last
    ]
    assert filters[0]["typed_config"]["@type"] == (
        "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
    )
    assert filters[1]["typed_config"]["@type"] == (
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    )
    types = [value for key, value in walk(envoy) if key == "@type"]
    assert len(types) >= 3
    for url in types:
        assert V3_TYPE.match(url), url
    assert hcm["use_remote_address"] is True  # X-Forwarded-For ends with the real peer


def test_envoy_clusters_exist_for_every_reference(envoy: dict[str, Any]) -> None:
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    for cluster in clusters.values():
        assert cluster["load_assignment"]["cluster_name"] == cluster["name"]
    routed = [
        route["route"]["cluster"]
        for vhost in _hcm(envoy)["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
    ]
    server_uri = _ext_authz(envoy)["http_service"]["server_uri"]
    referenced = {*routed, server_uri["cluster"]}
    assert referenced <= set(clusters), referenced - set(clusters)
    assert server_uri["timeout"]  # required by HttpUri
    # The authorization cluster and URI are Sluice's main listener (rules.yaml's default).
    rules, _ = _envoy_decide_route()
    (endpoint,) = [
        e["endpoint"]["address"]["socket_address"]
        for group in clusters[server_uri["cluster"]]["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert (endpoint["address"], endpoint["port_value"]) == (rules.listen.host, rules.listen.port)
    uri = urlsplit(server_uri["uri"])
    assert (uri.hostname, uri.port) == (rules.listen.host, rules.listen.port)


def test_envoy_path_prefix_is_the_sluice_decide_route(envoy: dict[str, Any]) -> None:
    authz = _ext_authz(envoy)
    rules, route = _envoy_decide_route()
    assert authz["http_service"]["path_prefix"] == route.match.path_prefix
    assert (route.decide.source, route.decide.strip_prefix) == ("envoy", True)
    assert route.decide.deny_status == 429  # Envoy returns it to the client as it is
    assert isinstance(authz["failure_mode_allow"], bool)
    # Exactly one allowed_headers list: the filter's own, or the deprecated per-service one.
    request = authz["http_service"].get("authorization_request", {})
    assert ("allowed_headers" in authz) != ("allowed_headers" in request)
    allowed = authz.get("allowed_headers") or request["allowed_headers"]
    # Every header the rules key on reaches Sluice, and X-Forwarded-For, since
    # Sluice trusts Envoy's address to name the client.
    needed = {"x-forwarded-for"} if rules.clients.trusted_proxies else set()
    for rule in rules.limits.values():
        needed |= {m.lower() for m in re.findall(r"header:([A-Za-z0-9-]+)", str(rule.key))}
    for name in needed:
        assert _matched(allowed["patterns"], name), name


def _matched(patterns: list[Mapping[str, Any]], header: str) -> bool:
    """Envoy's StringMatcher (exact, prefix, suffix, contains; ignore_case) on a header name."""
    name = header.lower()  # Envoy keeps header names lower-case
    for pattern in patterns:
        fold = (lambda s: s.lower()) if pattern.get("ignore_case") else (lambda s: s)
        for kind in ("exact", "prefix", "suffix", "contains"):
            if kind not in pattern:
                continue
            want, got = fold(pattern[kind]), fold(name)
            if (
                (kind == "exact" and got == want)
                or (kind == "prefix" and got.startswith(want))
                or (kind == "suffix" and got.endswith(want))
                or (kind == "contains" and want in got)
            ):
                return True
    return False


LIMIT_HEADERS = re.compile(r"^(retry-after|x-ratelimit-.*|ratelimit|ratelimit-policy)$")


async def test_envoy_shaped_requests_get_the_answers_envoy_yaml_passes_on(
    envoy: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sluice on deploy/envoy/rules.yaml, asked the way ext_authz's HTTP service
    asks (original method, path_prefix + path, only the allowed headers, no
    body): 200 with limit headers that envoy.yaml copies to the client, then
    Sluice's own 429 whose every limit header envoy.yaml lets through."""
    monkeypatch.setenv("SLUICE_LISTEN", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("SLUICE_ADMIN_LISTEN", f"127.0.0.1:{free_port()}")
    for name, value in RECIPE_ENV.items():
        monkeypatch.setenv(name, value)
    authz = _ext_authz(envoy)
    prefix = authz["http_service"]["path_prefix"]
    response = authz["http_service"]["authorization_response"]
    on_deny = response["allowed_client_headers"]["patterns"]
    on_success = response["allowed_client_headers_on_success"]["patterns"]
    envoy_headers = {  # what Envoy (use_remote_address) sends on for a client 192.0.2.7
        "x-forwarded-for": "192.0.2.7",
        "x-api-key": "envoy-client",
        "content-length": "0",
    }
    writes = load_rules(DEPLOY / "envoy" / "rules.yaml").limits["writes"].quotas[0].limit
    async with running(DEPLOY / "envoy" / "rules.yaml") as sluice:
        async with aiohttp.ClientSession() as session:
            codes = []
            for _ in range(writes + 1):
                url = sluice.url + prefix + "/api/orders?page=2"
                async with session.post(url, headers=envoy_headers) as r:
                    codes.append(r.status)
                    names = {n.lower() for n in r.headers}
                    limit_headers = {n for n in names if LIMIT_HEADERS.match(n)}
                    if r.status == 200:
                        assert {"x-ratelimit-remaining", "ratelimit"} <= limit_headers
                        for name in limit_headers:
                            assert _matched(on_success, name), name
                    else:
                        body = await r.json()
                        assert body["rule"] == "writes"  # the stripped path and method were used
                        assert "retry-after" in limit_headers
                        for name in limit_headers | {"content-type"}:
                            assert _matched(on_deny, name), name
            assert codes == [200] * writes + [429]
            # Another client behind the same Envoy is not affected (X-Forwarded-For believed).
            other = {**envoy_headers, "x-forwarded-for": "192.0.2.8", "x-api-key": "other"}
            async with session.post(sluice.url + prefix + "/api/orders", headers=other) as r:
                assert r.status == 200

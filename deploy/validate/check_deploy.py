"""Offline checks of deploy/: the Kubernetes manifests, the compose file and the Dockerfile.

Run by .ci/validate-deploy.sh in its venv (PyYAML, jsonschema, kubernetes-validate, and the
docker-compose binary given with --compose-bin). Needs no Docker engine, cluster or network.
Prints one line per check; exits 1 if any failed.

- Kubernetes: each object against the Kubernetes schemas bundled in kubernetes-validate (strict:
  unknown fields fail) for each version given. Kinds without a bundled schema (KEDA's
  ScaledObject, the Kustomization) are checked against the schemas below; any other unknown
  kind fails. Then the wiring between objects: env names are klingq settings, referenced
  ConfigMaps, Secrets and keys exist, each `*_FILE` names a mounted secret key, probes use
  declared ports that the bind addresses listen on, selectors select pods, the worker's
  termination grace exceeds its shutdown grace, and the ScaledObject's ceiling and threshold
  follow from the provider and per-pod concurrency.
- Compose: `docker-compose config` (the compose spec, without an engine) with every profile
  turned on, then the same env-name rule and the wiring between services.
- Dockerfile: the shape deploy/README.md promises (hadolint runs separately).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import yaml

# Environment variables klingq reads that are not settings in config/default.toml: the AWS
# SDK's credentials, the log filter, the config file, and the webhook settings until the
# registry renders them (harmless once it does).
EXTRA_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "RUST_LOG",
    "KLINGQ_CONFIG",
    "KLINGQ_WEBHOOK_SECRET",
    "KLINGQ_WEBHOOK_ALLOW_CIDRS",
} | set(
    # The OpenTelemetry SDK's own variables (builds with the `otlp` feature).
    "OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT OTEL_EXPORTER_OTLP_HEADERS "
    "OTEL_EXPORTER_OTLP_TIMEOUT OTEL_SERVICE_NAME OTEL_RESOURCE_ATTRIBUTES OTEL_TRACES_SAMPLER "
    "OTEL_TRACES_SAMPLER_ARG OTEL_BSP_SCHEDULE_DELAY OTEL_BSP_MAX_QUEUE_SIZE".split()
)
# `<VAR>_FILE` is read for settings only, not for the variables the AWS SDK reads itself.
NO_FILE_VARIANT = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RUST_LOG", "KLINGQ_CONFIG"} | {
    name for name in EXTRA_ENV if name.startswith("OTEL_")
}

# Grace the kubelet/Docker must leave beyond the worker's own shutdown grace.
MIN_GRACE_MARGIN_SECS = 10

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
HPA_POLICY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "value", "periodSeconds"],
    "properties": {
        "type": {"enum": ["Pods", "Percent"]},
        "value": {"type": "integer", "minimum": 1},
        "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
    },
}
HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "minItems": 1, "items": HPA_POLICY},
    },
}
# KEDA 2.x ScaledObject (keda.sh/v1alpha1), written from KEDA's ScaledObject specification:
# the fields of spec, closed so that a misspelt field fails.
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                            ]
                        },
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": HPA_RULES, "scaleDown": HPA_RULES},
                                },
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # KEDA reads trigger metadata as strings only: `threshold: 10`
                            # (a number) is rejected by the API server.
                            "metadata": STRING_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# Metadata each KEDA trigger type this repository may use cannot do without.
TRIGGER_REQUIRED_METADATA = {
    "prometheus": [("serverAddress",), ("query",), ("threshold",)],
}
# The fields of kustomize.config.k8s.io/v1beta1 Kustomization this repository may use.
KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "namespace": {"type": "string"},
        "namePrefix": {"type": "string"},
        "nameSuffix": {"type": "string"},
        "resources": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "labels": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["pairs"],
                "properties": {
                    "pairs": STRING_MAP,
                    "includeSelectors": {"type": "boolean"},
                    "includeTemplates": {"type": "boolean"},
                },
            },
        },
        "commonAnnotations": STRING_MAP,
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "newName": {"type": "string"},
                    "newTag": {"type": "string"},
                    "digest": {"type": "string"},
                },
            },
        },
    },
}
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA,
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): KUSTOMIZATION_SCHEMA,
}


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, condition: bool, what: str) -> bool:
        if condition:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failed += 1
            print(f"  FAIL  {what}")
        return condition


def unknown_note(names: list[str]) -> str:
    return f" (unknown: {', '.join(names)})" if names else ""


class Settings:
    """klingq's settings as config/default.toml lists them: env names and defaults."""

    def __init__(self, repo: Path) -> None:
        lines = (repo / "config" / "default.toml").read_text().splitlines()
        self.defaults: dict[str, str] = {}
        names = set()
        for i, line in enumerate(lines):
            match = re.search(r"\(env: ([A-Z0-9_]+)\)$", line)
            if not match:
                continue
            names.add(match.group(1))
            value = re.match(r"^[a-z_]+ = (.*)$", lines[i + 1]) if i + 1 < len(lines) else None
            if value:
                self.defaults[match.group(1)] = value.group(1).strip().strip('"')
        if not names:
            raise SystemExit("no `(env: NAME)` found in config/default.toml")
        names |= EXTRA_ENV
        self.env_names = names | {f"{n}_FILE" for n in names - NO_FILE_VARIANT}

    def unknown(self, env: Iterable[str]) -> list[str]:
        return sorted(set(env) - self.env_names)

    def value(self, env: dict[str, str], name: str) -> str:
        """The value a process with environment `env` sees for setting `name`."""
        return env.get(name, self.defaults.get(name, ""))


def bind_port(address: str) -> int | None:
    match = re.match(r"^(?:\[[^\]]*\]|[^:]*):(\d+)$", address)
    return int(match.group(1)) if match else None


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("::1", "localhost") or host.startswith("127.")


def webhook_secret_ok(text: str) -> bool:
    """`whsec_<base64 of 24 to 64 bytes>`, several separated by spaces or commas."""
    parts = text.replace(",", " ").split()
    for part in parts:
        encoded = part.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:
            return False
        if not 24 <= len(key) <= 64:
            return False
    return bool(parts)


# ---------------------------------------------------------------------------------------------
# Kubernetes


def name_of(doc: dict) -> str:
    name = doc.get("metadata", {}).get("name")
    return f"{doc['kind']}/{name}" if name else doc["kind"]


def manifest_files(k8s_dir: Path) -> list[Path]:
    return sorted(list(k8s_dir.glob("*.yaml")) + list(k8s_dir.glob("*.yml")))


def load_k8s(k8s_dir: Path, report: Report) -> list[tuple[str, dict]]:
    objects = []
    for path in manifest_files(k8s_dir):
        try:
            docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        except yaml.YAMLError as error:
            report.check(False, f"{path.name} parses as YAML: {error}")
            continue
        for doc in docs:
            if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc:
                objects.append((path.name, doc))
            else:
                report.check(False, f"{path.name}: a document without apiVersion and kind")
    return objects


def validate_k8s_schemas(objects, versions: list[str], report: Report) -> None:
    for filename, doc in objects:
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM_SCHEMAS:
            errors = sorted(
                jsonschema.Draft202012Validator(CUSTOM_SCHEMAS[key]).iter_errors(doc),
                key=lambda e: list(e.path),
            )
            detail = "; ".join(
                f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors
            )
            report.check(
                not errors,
                f"{filename}: {name_of(doc)} matches the {doc['kind']} schema"
                + (f": {detail}" if errors else ""),
            )
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                report.check(True, f"{filename}: {name_of(doc)} is valid for Kubernetes {version}")
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(p) for p in error.path) or "<root>"
                report.check(
                    False,
                    f"{filename}: {name_of(doc)} is invalid for Kubernetes {version}: "
                    f"{path}: {error.message}",
                )
            except kubernetes_validate.SchemaNotFoundError as error:
                report.check(False, f"{filename}: {error.message}, nor in check_deploy.py")
                break


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


class Cluster:
    """The objects of deploy/k8s, indexed by kind and name."""

    def __init__(self, objects: list[tuple[str, dict]]) -> None:
        self.by_kind: dict[str, dict[str, dict]] = {}
        for _, doc in objects:
            name = doc.get("metadata", {}).get("name", "")
            self.by_kind.setdefault(doc["kind"], {})[name] = doc

    def kind(self, kind: str) -> dict[str, dict]:
        return self.by_kind.get(kind, {})

    def secret_keys(self, name: str) -> set[str]:
        secret = self.kind("Secret").get(name, {})
        return set(secret.get("data") or {}) | set(secret.get("stringData") or {})

    def configmap_data(self, name: str) -> dict[str, str]:
        return self.kind("ConfigMap").get(name, {}).get("data") or {}

    def workloads(self) -> Iterator[dict]:
        for kind in ("Deployment", "StatefulSet", "DaemonSet"):
            yield from self.kind(kind).values()

    def environment(self, container: dict) -> dict[str, str]:
        """What the container's process sees: ConfigMaps from envFrom, then env (literal
        values; values from Secrets are present but empty)."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.configmap_data(source["configMapRef"]["name"]))
        env.update({v["name"]: v.get("value", "") for v in container.get("env", [])})
        return env


def check_configmaps(cluster: Cluster, settings: Settings, report: Report) -> None:
    for name, doc in cluster.kind("ConfigMap").items():
        unknown = settings.unknown(doc.get("data") or {})
        report.check(
            not unknown,
            f"ConfigMap/{name}: every key is a klingq environment variable" + unknown_note(unknown),
        )


def check_env_references(cluster: Cluster, where: str, container: dict, report: Report) -> None:
    for source in container.get("envFrom", []):
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source.get("configMapRef") or source.get("secretRef")
        report.check(
            ref["name"] in cluster.kind(kind), f"{where}: envFrom {kind}/{ref['name']} exists"
        )
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            keys = cluster.secret_keys(ref["name"])
            kind = "Secret"
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            keys = set(cluster.configmap_data(ref["name"]))
            kind = "ConfigMap"
        else:
            continue
        report.check(
            ref["key"] in keys,
            f"{where}: {var['name']} reads {kind}/{ref['name']} key {ref['key']}, which exists",
        )


def check_secret_files(
    cluster: Cluster, where: str, container: dict, volumes: dict, report: Report
) -> None:
    """Every `<VAR>_FILE` names a file that a mounted Secret volume projects."""
    for var in container.get("env", []):
        if not var["name"].endswith("_FILE"):
            continue
        path = var.get("value", "")
        found = False
        for mount in container.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            secret = volumes.get(mount["name"], {}).get("secret")
            if not secret or not path.startswith(prefix):
                continue
            keys = cluster.secret_keys(secret["secretName"])
            items = secret.get("items")
            files = {i["path"] for i in items if i["key"] in keys} if items else keys
            found = found or path[len(prefix) :] in files
        report.check(found, f"{where}: {var['name']}={path} is a key of a mounted Secret")


def check_roles(
    settings: Settings, where: str, container: dict, pod: dict, env: dict, report: Report
) -> None:
    """Probes use declared ports; each role listens where it is probed, off loopback."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    probed = set()
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name, {}).get("httpGet")
        if probe:
            port = ports.get(probe["port"]) if isinstance(probe["port"], str) else probe["port"]
            report.check(
                port is not None, f"{where}: {probe_name} port {probe['port']} is declared"
            )
            probed.add(port)
    args = container.get("command", []) + container.get("args", [])
    role = next((a for a in args if a in ("worker", "serve")), None)
    if role is None:
        return
    var = "KLINGQ_WORKER_HEALTH_BIND" if role == "worker" else "KLINGQ_API_BIND"
    bind = settings.value(env, var)
    report.check(
        not is_loopback(bind) and bind_port(bind) in probed,
        f"{where}: {var}={bind} is off loopback and probed",
    )
    if role == "worker":
        grace = int(settings.value(env, "KLINGQ_WORKER_SHUTDOWN_GRACE_SECS"))
        termination = pod.get("terminationGracePeriodSeconds", 30)
        report.check(
            termination >= grace + MIN_GRACE_MARGIN_SECS,
            f"{where}: terminationGracePeriodSeconds {termination} >= "
            f"shutdown grace {grace} + {MIN_GRACE_MARGIN_SECS}",
        )
    else:
        report.check(
            "KLINGQ_API_TOKENS" in env or "KLINGQ_API_TOKENS_FILE" in env,
            f"{where}: bearer tokens are configured (required off loopback)",
        )


def check_workloads(cluster: Cluster, settings: Settings, report: Report) -> None:
    for workload in cluster.workloads():
        wname = name_of(workload)
        template = workload["spec"]["template"]
        report.check(
            selects(workload["spec"].get("selector", {}), template["metadata"].get("labels", {})),
            f"{wname}: spec.selector selects the pod template's labels",
        )
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "secret" not in volume:
                continue
            name = volume["secret"]["secretName"]
            missing = [
                item["key"]
                for item in volume["secret"].get("items", [])
                if item["key"] not in cluster.secret_keys(name)
            ]
            report.check(
                name in cluster.kind("Secret") and not missing,
                f"{wname}: volume {volume['name']} projects keys of Secret/{name} that exist"
                + (f" (missing: {', '.join(missing)})" if missing else ""),
            )
        for container in pod["containers"]:
            where = f"{wname} container {container['name']}"
            env = cluster.environment(container)
            unknown = settings.unknown({v["name"] for v in container.get("env", [])})
            report.check(
                not unknown,
                f"{where}: every env name is a klingq environment variable" + unknown_note(unknown),
            )
            check_env_references(cluster, where, container, report)
            check_secret_files(cluster, where, container, volumes, report)
            check_roles(settings, where, container, pod, env, report)


def check_selectors(cluster: Cluster, report: Report) -> None:
    """Services and PodDisruptionBudgets select pods; Services target declared ports."""
    workloads = list(cluster.workloads())
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in cluster.kind(kind).items():
            selector = doc["spec"].get("selector", {})
            if kind == "Service":
                selector = {"matchLabels": selector}
            targets = [
                w
                for w in workloads
                if selects(selector, w["spec"]["template"]["metadata"].get("labels", {}))
            ]
            report.check(
                bool(targets),
                f"{kind}/{name}: selects the pods of "
                + (", ".join(name_of(t) for t in targets) or "nothing"),
            )
            if kind != "Service":
                continue
            declared = {
                value
                for w in targets
                for c in w["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
                for value in (p.get("name"), p["containerPort"])
            }
            for port in doc["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                report.check(
                    target in declared, f"Service/{name}: targetPort {target} is a container port"
                )


def check_scaled_objects(cluster: Cluster, settings: Settings, report: Report) -> None:
    for name, scaled in cluster.kind("ScaledObject").items():
        where = f"ScaledObject/{name}"
        spec = scaled["spec"]
        ref = spec["scaleTargetRef"]
        target = cluster.kind("Deployment").get(ref["name"])
        if not report.check(
            target is not None and ref.get("kind", "Deployment") == "Deployment",
            f"{where}: targets Deployment/{ref['name']}, which exists",
        ):
            continue
        report.check(
            "replicas" not in target["spec"],
            f"{where}: Deployment/{ref['name']} leaves spec.replicas to the autoscaler",
        )
        env = cluster.environment(target["spec"]["template"]["spec"]["containers"][0])
        provider = int(settings.value(env, "KLINGQ_PROVIDER_CONCURRENCY"))
        per_pod = int(settings.value(env, "KLINGQ_WORKER_CONCURRENCY"))
        queue = settings.value(env, "KLINGQ_QUEUE")
        ceiling = max(1, math.ceil(provider / per_pod))
        minimum = spec.get("minReplicaCount", 0)
        maximum = spec.get("maxReplicaCount", 100)
        report.check(
            minimum >= 1,
            f"{where}: minReplicaCount {minimum} >= 1 (retries, leases and webhooks need a worker)",
        )
        report.check(
            maximum == ceiling,
            f"{where}: maxReplicaCount {maximum} == ceil(KLINGQ_PROVIDER_CONCURRENCY {provider}"
            f" / KLINGQ_WORKER_CONCURRENCY {per_pod}) = {ceiling}",
        )
        if "fallback" in spec:
            replicas = spec["fallback"]["replicas"]
            report.check(
                minimum <= replicas <= maximum,
                f"{where}: fallback replicas {replicas} within [{minimum}, {maximum}]",
            )
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            for alternatives in TRIGGER_REQUIRED_METADATA.get(trigger["type"], []):
                report.check(
                    any(a in metadata for a in alternatives),
                    f"{where}: the {trigger['type']} trigger sets {' or '.join(alternatives)}",
                )
            if trigger["type"] != "prometheus":
                continue
            query = metadata.get("query", "")
            report.check(
                "klingq_queue_jobs" in query and f'queue="{queue}"' in query,
                f"{where}: the query reads klingq_queue_jobs of queue {queue}",
            )
            report.check(
                all(query.count(a) == query.count(b) for a, b in ("()", "{}", "[]")),
                f"{where}: the query's brackets balance",
            )
            threshold = metadata.get("threshold", "")
            report.check(
                re.fullmatch(r"\d+(\.\d+)?", threshold) is not None and float(threshold) == per_pod,
                f"{where}: threshold {threshold} == KLINGQ_WORKER_CONCURRENCY {per_pod}",
            )


def check_kustomization(k8s_dir: Path, objects, cluster: Cluster, report: Report) -> None:
    kustomizations = [doc for _, doc in objects if doc["kind"] == "Kustomization"]
    if not report.check(len(kustomizations) == 1, "deploy/k8s has one Kustomization"):
        return
    listed = kustomizations[0]["resources"]
    files = [p.name for p in manifest_files(k8s_dir) if p.name != "kustomization.yaml"]
    missing = [r for r in listed if not (k8s_dir / r).is_file()]
    unlisted = [f for f in files if f not in listed]
    report.check(
        not missing,
        "kustomization: every listed resource exists"
        + (f" (missing: {missing})" if missing else ""),
    )
    report.check(
        not unlisted,
        "kustomization: every manifest is listed"
        + (f" (unlisted: {unlisted})" if unlisted else ""),
    )
    images = {image["name"] for image in kustomizations[0].get("images", [])}
    for workload in cluster.workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            image = container["image"].split("@")[0]
            if ":" in image.rsplit("/", 1)[-1]:
                image = image.rsplit(":", 1)[0]
            report.check(
                image in images,
                f"{name_of(workload)} container {container['name']}: image {image} is set by"
                " the kustomization's images",
            )


# ---------------------------------------------------------------------------------------------
# Compose


def host_of(url: str) -> str | None:
    return urlparse(url).hostname


def redis_hosts(url: str) -> list[str | None]:
    """The hosts of a `queue.redis_url`: one node, a comma-separated list of cluster seed nodes,
    or `redis+sentinel://host:port[,host:port...]/service` (the sentinels)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return [None]
    if scheme.lower().endswith("+sentinel"):
        netloc = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        return [host_of(f"redis://{node}") for node in netloc.split(",")]
    return [host_of(node.strip()) for node in url.split(",")]


def flags(command: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` options of a command line."""
    out = {}
    for i, arg in enumerate(command):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            out[key] = value
        elif i + 1 < len(command) and not command[i + 1].startswith("-"):
            out[arg[2:]] = command[i + 1]
    return out


def duration_secs(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", text)
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0) if match else 0


def s3_identities(service: dict) -> set[tuple[str, str]]:
    """Access key pairs of the SeaweedFS identity files a service mounts."""
    pairs = set()
    for volume in service.get("volumes", []):
        source = Path(volume.get("source", ""))
        if source.suffix == ".json" and source.is_file():
            for identity in json.loads(source.read_text()).get("identities", []):
                for cred in identity.get("credentials", []):
                    pairs.add((cred["accessKey"], cred["secretKey"]))
    return pairs


def check_compose(compose_file: Path, compose_bin: str, settings: Settings, report: Report) -> None:
    def compose(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [compose_bin, "-f", str(compose_file), *args],
            capture_output=True,
            text=True,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": "/nonexistent",
                "DOCKER_HOST": "unix:///nonexistent",
            },
        )

    # Services of every profile (e.g. `cluster`) are checked too.
    listed = compose("config", "--profiles")
    profiles = listed.stdout.split() if listed.returncode == 0 else []
    result = compose(*(arg for p in profiles for arg in ("--profile", p)), "config", "--format", "json")
    if not report.check(
        result.returncode == 0,
        f"{compose_file.name}: `docker-compose config` accepts it"
        + (f" with profiles {', '.join(profiles)}" if profiles else "")
        + (f": {result.stderr.strip()}" if result.returncode else ""),
    ):
        return
    services = json.loads(result.stdout).get("services", {})
    for name, service in services.items():
        command = service.get("command") or []
        role = command[0] if command and command[0] in ("worker", "serve", "sim") else None
        if role is None:
            continue
        where = f"service {name}"
        if role == "sim":
            public = flags(command).get("public-url", "")
            report.check(
                host_of(public) in services,
                f"{where}: --public-url {public or '(unset)'} names a service workers can reach",
            )
            continue
        env = {
            k: "" if v is None else str(v) for k, v in (service.get("environment") or {}).items()
        }
        unknown = settings.unknown(env)
        report.check(
            not unknown,
            f"{where}: every env name is a klingq environment variable" + unknown_note(unknown),
        )
        report.check(
            "KLINGQ_REDIS_URL" in env or "KLINGQ_REDIS_URL_FILE" in env,
            f"{where}: KLINGQ_REDIS_URL is set",
        )
        for host in redis_hosts(env.get("KLINGQ_REDIS_URL", "")) if "KLINGQ_REDIS_URL" in env else []:
            report.check(host in services, f"{where}: KLINGQ_REDIS_URL names service `{host}`")
        for var in ("KLINGQ_PROVIDER_BASE_URL", "KLINGQ_S3_ENDPOINT"):
            if var in env:
                host = host_of(env[var])
                report.check(host in services, f"{where}: {var} names service `{host}`")
        var = "KLINGQ_WORKER_HEALTH_BIND" if role == "worker" else "KLINGQ_API_BIND"
        bind = settings.value(env, var)
        report.check(not is_loopback(bind), f"{where}: {var}={bind} is off loopback")
        probe = " ".join(service.get("healthcheck", {}).get("test") or [])
        probed = {int(p) for p in re.findall(r"/dev/tcp/[^/\s]+/(\d+)", probe)}
        if probed:
            report.check(
                probed == {bind_port(bind)}, f"{where}: the healthcheck probes the port of {var}"
            )
        if role == "serve":
            report.check(
                "KLINGQ_API_TOKENS" in env or "KLINGQ_API_TOKENS_FILE" in env,
                f"{where}: bearer tokens are configured (required off loopback)",
            )
            continue
        grace = int(settings.value(env, "KLINGQ_WORKER_SHUTDOWN_GRACE_SECS"))
        stop = service.get("stop_grace_period", "10s")
        report.check(
            duration_secs(stop) >= grace + MIN_GRACE_MARGIN_SECS,
            f"{where}: stop_grace_period {stop} >= shutdown grace {grace}s"
            f" + {MIN_GRACE_MARGIN_SECS}s",
        )
        if "KLINGQ_WEBHOOK_SECRET" in env:
            report.check(
                webhook_secret_ok(env["KLINGQ_WEBHOOK_SECRET"]),
                f"{where}: KLINGQ_WEBHOOK_SECRET is whsec_<base64 of 24 to 64 bytes>",
            )
        sim_name = host_of(env.get("KLINGQ_PROVIDER_BASE_URL", ""))
        sim_service = services.get(sim_name, {})
        sim = flags(sim_service.get("command") or []) if sim_service else {}
        if "api-key" in sim:
            report.check(
                env.get("RUNFLOW_API_KEY") == sim["api-key"],
                f"{where}: RUNFLOW_API_KEY is the key `{sim_name}` accepts",
            )
        if "max-concurrent-runs" in sim:
            report.check(
                env.get("KLINGQ_PROVIDER_CONCURRENCY") == sim["max-concurrent-runs"],
                f"{where}: KLINGQ_PROVIDER_CONCURRENCY is `{sim_name}`'s --max-concurrent-runs",
            )
        s3_name = host_of(env.get("KLINGQ_S3_ENDPOINT", ""))
        if s3_name in services:
            report.check(
                (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"))
                in s3_identities(services[s3_name]),
                f"{where}: its AWS keys are an identity in `{s3_name}`'s S3 config",
            )


# ---------------------------------------------------------------------------------------------
# Dockerfile


def check_dockerfile(deploy: Path, repo: Path, report: Report) -> None:
    text = (deploy / "Dockerfile").read_text()
    joined = text.replace("\\\n", " ")
    instructions = [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    stages = [i for i, line in enumerate(instructions) if line.upper().startswith("FROM ")]
    report.check(len(stages) >= 2, "Dockerfile: multi-stage (a build stage and a runtime stage)")
    final = instructions[stages[-1] :] if stages else []
    workspace = re.search(r'^rust-version = "([^"]+)"', (repo / "Cargo.toml").read_text(), re.M)
    arg = re.search(r"^ARG RUST_VERSION=(\S+)", text, re.M)
    report.check(
        bool(workspace and arg and arg.group(1) == workspace.group(1)),
        f"Dockerfile: ARG RUST_VERSION {arg.group(1) if arg else '(unset)'} is the workspace's"
        f" rust-version {workspace.group(1) if workspace else '(unset)'}",
    )
    report.check(
        re.search(r"cargo build --release --locked -p klingq\b", joined) is not None,
        "Dockerfile: builds with `cargo build --release --locked -p klingq`",
    )
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    report.check(
        bool(users) and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]) is not None,
        f"Dockerfile: the runtime stage runs as a numeric non-root user"
        f" ({users[-1] if users else 'none'})",
    )
    entrypoints = [line for line in final if line.upper().startswith("ENTRYPOINT ")]
    report.check(
        bool(entrypoints) and json.loads(entrypoints[-1].split(None, 1)[1]) == ["klingq"],
        'Dockerfile: ENTRYPOINT ["klingq"]',
    )
    report.check(
        not any(line.upper().startswith("HEALTHCHECK ") for line in instructions),
        "Dockerfile: no HEALTHCHECK (orchestrators probe)",
    )
    ignored = (deploy / "Dockerfile.dockerignore").read_text().split()
    for pattern in ("target", ".tools", ".git"):
        report.check(pattern in ignored, f"Dockerfile.dockerignore excludes {pattern}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--compose-bin", required=True, help="a docker-compose binary")
    parser.add_argument("--kube-versions", default="1.30.0,1.37.0")
    args = parser.parse_args()
    repo = args.repo.resolve()
    deploy = repo / "deploy"
    report = Report()
    settings = Settings(repo)
    versions = [v for v in args.kube_versions.split(",") if v]

    print(f"--- Kubernetes objects in deploy/k8s (schemas of Kubernetes {', '.join(versions)})")
    objects = load_k8s(deploy / "k8s", report)
    validate_k8s_schemas(objects, versions, report)
    print("--- Kubernetes wiring")
    cluster = Cluster(objects)
    check_configmaps(cluster, settings, report)
    check_workloads(cluster, settings, report)
    check_selectors(cluster, report)
    check_scaled_objects(cluster, settings, report)
    check_kustomization(deploy / "k8s", objects, cluster, report)
    print("--- deploy/compose.yaml wiring")
    check_compose(deploy / "compose.yaml", args.compose_bin, settings, report)
    print("--- deploy/Dockerfile")
    check_dockerfile(deploy, repo, report)
    total = report.passed + report.failed
    if report.failed:
        print(f"deploy checks: {report.failed} of {total} FAILED")
        return 1
    print(f"deploy checks: all {total} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

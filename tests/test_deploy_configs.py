"""The deployment files agree with the repository: cluster.yaml, infra/Dockerfile, infra/k8s/*.yaml.

Nothing in CI starts a cluster from them, so these checks keep them honest: they parse, name entry
points and configs that exist, carry the Ray version pyproject.toml pins, keep the head free of work
and the GPU workers scaling from zero, keep Ray's token authentication on, and hold no secret value.
The deployment is locked down: every pod runs as non-root without privileges on a read-only root file
system and without an API token it does not need, NetworkPolicies admit only the right pods to
MLflow, Postgres and the Ray heads, MLflow runs its basic-auth app, every credential comes from a
Secret, and nothing reports usage. Fast: no network, no Ray.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import importlib.util
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
K8S = ROOT / "infra" / "k8s"
K8S_FILES = sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])
YAML_FILES = [CLUSTER, *K8S_FILES]
EXPECTED_K8S = {"raycluster.yaml", "rayjob-backfill.yaml", "raycronjob-retrain.yaml",
                "cronjob-retrain.yaml", "mlflow.yaml", "mlflow-users.yaml", "networkpolicies.yaml"}

SENSITIVE = ("KEY", "SECRET", "TOKEN", "PASSWORD")
NOT_SECRET = {"TOKENIZERS_PARALLELISM"}  # holds TOKEN in its name, not a secret
SEMVEC_IMAGE = "ghcr.io/semvec/semvec:"
RAY_VERSION_PATTERNS = (
    r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)",  # base images
    r"-ray(\d+\.\d+\.\d+)",  # semvec image tags: <semvec version>-ray<ray version>-<gpu|cpu>
    r"\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)",  # pip pins
    r"rayVersion:\s*[\"']?(\d+\.\d+\.\d+)",  # KubeRay
    r"ray\.__version__\s*==\s*[\"'](\d+\.\d+\.\d+)",  # cluster.yaml's image check
)


def _pinned_ray() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10 has no tomllib; every dependency is a quoted string
        deps = re.findall(r'"([^"]+)"', text)
    pins = [m.group(2) for d in deps if (m := re.fullmatch(r"ray(\[[^\]]*\])?\s*==\s*([\w.]+)", d.strip()))]
    assert len(pins) == 1, f"expected one ray[...]==X pin in pyproject.toml, found {pins}"
    return pins[0]


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node):
    """Every node of a parsed YAML document, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def _texts(path: Path) -> list[str]:
    """The raw file, plus every command given as a list of words joined into one line."""
    texts = [path.read_text()]
    if path.suffix in (".yaml", ".yml"):
        for doc in _docs(path):
            texts += [" ".join(n) for n in _walk(doc) if isinstance(n, list) and n
                      and all(isinstance(w, str) for w in n)]
    return texts


def _readme_cluster_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Running on a cluster\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Running on a cluster' section"
    return match.group(1)


def _sensitive(name: str) -> bool:
    return name not in NOT_SECRET and any(word in name.upper() for word in SENSITIVE)


def _dockerfile_from() -> str:
    """The FROM image with ARG defaults substituted."""
    args, image = {}, None
    for line in DOCKERFILE.read_text().splitlines():
        if m := re.match(r"\s*ARG\s+(\w+)=(\S*)", line):
            args[m.group(1)] = m.group(2)
        elif m := re.match(r"\s*FROM\s+(\S+)", line, re.I):
            image = re.sub(r"\$\{?(\w+)\}?", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
    assert image, "infra/Dockerfile has no FROM"
    return image


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for every RayCluster, and every RayJob / RayCronJob that makes one."""
    specs = []
    for path in K8S_FILES:
        for doc in _docs(path):
            kind, spec = doc.get("kind"), doc.get("spec") or {}
            job = spec.get("jobTemplate", {}) if kind == "RayCronJob" else spec
            if kind == "RayCluster":
                specs.append((f"{path.name} {kind}", spec))
            elif kind in ("RayJob", "RayCronJob"):
                has_cluster = "rayClusterSpec" in job or "clusterSelector" in job
                assert has_cluster, f"{path.name}: {kind} names no cluster"
                if "rayClusterSpec" in job:
                    specs.append((f"{path.name} {kind}", job["rayClusterSpec"]))
    return specs


def _gpus(group: dict) -> int:
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    return sum(int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))
               for c in containers)


def test_expected_deploy_files_exist():
    assert CLUSTER.is_file() and DOCKERFILE.is_file()
    assert EXPECTED_K8S <= {p.name for p in K8S_FILES}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    if path.parent == K8S:
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: no apiVersion or kind"
            if doc["kind"].startswith("Ray"):
                assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['kind']} is {doc['apiVersion']}"


def test_named_entry_points_and_configs_exist():
    texts = [t for p in [*YAML_FILES, DOCKERFILE] for t in _texts(p)] + [_readme_cluster_section()]
    modules = {m for t in texts for m in re.findall(r"-m\s+pipelines\.(\w+)", t)}
    configs = {c for t in texts for c in re.findall(r"pipelines/configs/[\w.-]+\.ya?ml", t)}
    assert {"backfill", "retrain"} <= modules, f"entry points named: {sorted(modules)}"
    assert configs, "no pipelines/configs/*.yaml named"
    missing = sorted({f"pipelines/{m}.py" for m in modules} | configs)
    missing = [p for p in missing if not (ROOT / p).is_file()]
    assert not missing, f"named but not in the repository: {missing}"


def _entry_points() -> list[tuple[str, list[str]]]:
    """(file, argv after `python -m`) of every job a manifest or the README's cluster section runs."""
    import shlex

    found = []
    for path in [*YAML_FILES]:
        for doc in _docs(path):
            for node in _walk(doc):
                if isinstance(node, dict) and isinstance(node.get("entrypoint"), str):
                    found.append((path.name, shlex.split(node["entrypoint"])))
                for key in ("command", "args"):
                    if isinstance(node, dict) and isinstance(node.get(key), list) and "-m" in node[key]:
                        found.append((path.name, [str(a) for a in node[key]]))
    readme = _readme_cluster_section().replace("\\\n", " ")
    found += [("README.md", shlex.split(m)) for m in re.findall(r"python -m pipelines\.[^\n`]+", readme)]
    return [(name, argv[argv.index("-m") + 1:]) for name, argv in found if "-m" in argv]


def test_every_job_command_in_the_manifests_parses_and_validates():
    """The flags in manifests and the README exist and make a valid config (no store is touched)."""
    import importlib

    from pipelines._job import build_parser
    from semvec.config import EmbedConfig, load_embed_config
    from semvec.retrain.config import RetrainConfig, load_retrain_config
    from semvec.train.config import TrainConfig, load_train_config

    jobs = {"pipelines.backfill": (EmbedConfig, load_embed_config),
            "pipelines.finetune": (TrainConfig, load_train_config),
            "pipelines.retrain": (RetrainConfig, load_retrain_config)}
    commands = _entry_points()
    assert {w for w, _ in commands} >= {"rayjob-backfill.yaml", "raycronjob-retrain.yaml",
                                        "cronjob-retrain.yaml", "README.md"}
    for where, argv in commands:
        cls, load = jobs[argv[0]]
        module = importlib.import_module(argv[0])
        parser, fields = build_parser(module.__doc__, cls, getattr(module, "extra_flags", None))
        args = parser.parse_args(argv[1:])
        overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
        assert overrides, f"{where}: {argv} overrides nothing"
        load(ROOT / args.config, **overrides)


def test_ray_version_matches_pyproject_pin():
    pinned = _pinned_ray()
    for path in [*YAML_FILES, DOCKERFILE]:
        found = {v for pattern in RAY_VERSION_PATTERNS for v in re.findall(pattern, path.read_text())}
        runs_nothing = path.suffix == ".yaml" and not any(
            isinstance(n, dict) and "image" in n for doc in _docs(path) for n in _walk(doc))
        assert found or runs_nothing, f"{path.name} names no Ray version"
        if runs_nothing:  # networkpolicies.yaml
            continue
        assert found == {pinned}, f"{path.name} names Ray {sorted(found)}, pyproject.toml pins {pinned}"
    readme = {v for pattern in RAY_VERSION_PATTERNS for v in re.findall(pattern, _readme_cluster_section())}
    assert readme <= {pinned}, f"README names Ray {sorted(readme)}, pyproject.toml pins {pinned}"


def test_images_carry_the_pinned_ray():
    pinned = _pinned_ray()
    images = [n[key] for p in YAML_FILES for doc in _docs(p) for n in _walk(doc) if isinstance(n, dict)
              for key in ("image", "head_image", "worker_image") if isinstance(n.get(key), str)]
    semvec = [i for i in images if i.startswith(SEMVEC_IMAGE)]
    assert semvec, "no manifest runs the semvec image"
    for image in semvec:
        assert f"-ray{pinned}-" in image, f"{image} is not built on Ray {pinned}"
    for image in images:
        if image.startswith("rayproject/ray"):
            assert image.split(":")[1].startswith(f"{pinned}-"), f"{image} is not Ray {pinned}"


def test_dockerfile_builds_on_the_pinned_ray():
    pinned = _pinned_ray()
    image = _dockerfile_from()
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pinned)}-py3\d+(-gpu|-cpu)?", image), image
    workdirs = re.findall(r"^\s*WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)
    assert workdirs, "infra/Dockerfile sets no WORKDIR"
    # the manifests ship the image's copy of the repository as the job's working directory
    used = {d for p in K8S_FILES for t in _texts(p)
            for d in re.findall(r"(?:--working-dir[ =]|working_dir:\s*)(/[^\s\"']+)", t)}
    assert used <= {workdirs[-1]}, f"working dirs {sorted(used)}, the image's repository is at {workdirs[-1]}"


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "out", "mlruns", "mlflow.db"} <= ignored


@pytest.mark.parametrize("path", [*YAML_FILES, DOCKERFILE], ids=lambda p: p.name)
def test_no_secret_values(path):
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name} holds an AWS access key id"
    for name, value in re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)", text):
        assert not _sensitive(name) or value.startswith("$"), f"{path.name} sets {name} to a literal"
    for user, password in re.findall(r"\w+://([^/\s:@]+):([^/\s@]+)@", text):
        assert user.startswith("$") and password.startswith("$"), f"{path.name}: a URI with credentials"
    if path == DOCKERFILE:
        names = re.findall(r"^\s*(?:ENV|ARG)\s+(.+)$", text, re.M)
        for name in (w.split("=")[0] for line in names for w in line.split() if w != "\\"):
            assert not _sensitive(name), f"infra/Dockerfile bakes {name} into the image"
        return
    for doc in _docs(path):
        if doc.get("kind") == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{path.name} defines Secret values"
        for node in _walk(doc):
            if not isinstance(node, dict):
                continue
            for var in node.get("env") or []:
                if isinstance(var, dict) and _sensitive(var.get("name", "")):
                    assert "value" not in var, f"{path.name}: {var['name']} has a literal value"
                    assert "secretKeyRef" in (var.get("valueFrom") or {}), f"{path.name}: {var['name']}"
            for source in node.get("envFrom") or []:
                assert "secretRef" in source or "configMapRef" in source, f"{path.name}: envFrom {source}"


def test_cluster_yaml_head_takes_no_work_and_gpu_workers_scale_from_zero():
    config = _docs(CLUSTER)[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head.get("resources", {}).get("CPU") == 0, "the head node type must advertise CPU: 0"
    gpu = {name: t for name, t in types.items() if name != config["head_node_type"]
           and (t.get("resources", {}).get("GPU", 0) > 0
                or re.match(r"(g|p)\d", t.get("node_config", {}).get("InstanceType", "")))}
    assert gpu, "cluster.yaml has no GPU worker type"
    for name, t in gpu.items():
        assert t.get("min_workers") == 0, f"{name}: min_workers must be 0"
        assert t.get("max_workers", 0) >= 1, f"{name}: max_workers must allow a worker"


def test_cluster_yaml_keeps_token_auth_on():
    config = _docs(CLUSTER)[0]
    assert "--env RAY_AUTH_MODE=token" in config["docker"].get("run_options", [])
    assert any(remote.endswith(".ray/auth_token") for remote in config.get("file_mounts", {}))


def test_kuberay_clusters_head_takes_no_work_and_gpu_workers_scale_from_zero():
    pinned = _pinned_ray()
    specs = _ray_cluster_specs()
    assert any(where.endswith("RayCluster") for where, _ in specs), "no RayCluster in infra/k8s"
    for where, spec in specs:
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: head num-cpus"
        assert spec.get("rayVersion") == pinned, f"{where}: rayVersion {spec.get('rayVersion')}"
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{where}: token auth is off"
        gpu = [g for g in spec.get("workerGroupSpecs", []) if _gpus(g) > 0]
        assert gpu, f"{where}: no GPU worker group"
        for group in gpu:
            assert group.get("minReplicas") == 0, f"{where}: {group['groupName']} minReplicas"
            assert group.get("maxReplicas", 0) >= 1, f"{where}: {group['groupName']} maxReplicas"


def test_job_submitters_use_token_auth():
    submitters = 0
    for path in K8S_FILES:
        for doc in _docs(path):
            for node in _walk(doc):
                if not (isinstance(node, dict) and "submit" in " ".join(map(str, node.get("command") or []))):
                    continue
                submitters += 1
                env = {v["name"]: v for v in node.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{path.name}: RAY_AUTH_MODE"
                ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
                assert ref, f"{path.name}: RAY_AUTH_TOKEN must come from a Secret"
    assert submitters, "no `ray job submit` client in infra/k8s"


def test_nothing_turns_token_auth_off():
    texts = [p.read_text() for p in YAML_FILES] + [(ROOT / "README.md").read_text()]
    for text in texts:
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", text)
    assert "RAY_AUTH_MODE=token" in _readme_cluster_section()


def _ray_containers() -> list[tuple[str, dict]]:
    """(where, container) for every container of every Ray head and worker group."""
    found = []
    for where, spec in _ray_cluster_specs():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            for c in group.get("template", {}).get("spec", {}).get("containers", []):
                found.append((f"{where} {c.get('name')}", c))
    return found


def test_ray_usage_stats_are_off_everywhere():
    # Ray reports usage statistics to its collector by default; semvec's deployments never do.
    containers = _ray_containers()
    for path in K8S_FILES:
        for doc in _docs(path):
            containers += [(f"{path.name} submitter {n.get('name')}", n) for n in _walk(doc)
                           if isinstance(n, dict) and "submit" in " ".join(map(str, n.get("command") or []))]
    assert len(containers) >= 7, [where for where, _ in containers]
    for where, container in containers:
        env = {v["name"]: v.get("value") for v in container.get("env") or []}
        assert env.get("RAY_USAGE_STATS_ENABLED") == "0", f"{where}: RAY_USAGE_STATS_ENABLED"

    config = _docs(CLUSTER)[0]
    assert "--env RAY_USAGE_STATS_ENABLED=0" in config["docker"].get("run_options", [])
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config[key] if "ray start" in c]
    assert len(starts) == 2, starts
    for command in starts:
        assert "--disable-usage-stats" in command, command

    env = re.findall(r"^\s*(?:ENV\s+)?(\w+)=(\S+)", DOCKERFILE.read_text(), re.M)
    assert ("RAY_USAGE_STATS_ENABLED", "0") in env, "infra/Dockerfile leaves Ray usage stats on"

    for path in [*YAML_FILES, DOCKERFILE]:  # comments may tell how to turn them on
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"RAY_USAGE_STATS_ENABLED\s*[=:]\s*[\"']?1", text), path.name
        assert not re.search(r"(?<!dis)able-usage-stats", text), path.name


# ------------------------------------------------------------------ locked down (issue 15)

# What KubeRay puts on every Ray pod it makes (ray-operator/controllers/ray/common/pod.go, labelPod);
# the NetworkPolicies select Ray pods by these.
KUBERAY_LABELS = {"ray-head": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head"},
                  "ray-worker": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"}}
NAMESPACE = {"kubernetes.io/metadata.name": "semvec"}
OPERATOR = ({"app.kubernetes.io/name": "kuberay-operator"}, {"kubernetes.io/metadata.name": "kuberay-system"})
ELSEWHERE = ({"app.kubernetes.io/name": "anything"}, {"kubernetes.io/metadata.name": "another"})
READER, WRITER, ADMIN = "semvec-mlflow-reader", "semvec-mlflow-writer", "semvec-mlflow-admin"


@dataclass
class Pod:
    """A pod some manifest makes: where, its spec, its labels, its role (the component label, or
    ray-head / ray-worker / ray-submitter), and the autoscaler sidecar KubeRay adds to a head."""

    where: str
    spec: dict
    labels: dict
    role: str
    autoscaler: dict | None = None

    @property
    def containers(self) -> list[dict]:
        sidecar = [{"name": "autoscaler", **self.autoscaler}] if self.autoscaler is not None else []
        return [*self.spec.get("initContainers", []), *self.spec["containers"], *sidecar]


def _template_pod(where: str, template: dict, role: str | None = None, **kw) -> Pod:
    labels = (template.get("metadata") or {}).get("labels") or {}
    role = role or labels.get("app.kubernetes.io/component", "?")
    return Pod(where, template["spec"], {**labels, **KUBERAY_LABELS.get(role, {})}, role, **kw)


def _pods() -> list[Pod]:
    """Every pod template of infra/k8s: workloads, CronJob, Ray heads and workers, RayJob submitters."""
    pods = []
    for path in K8S_FILES:
        for doc in _docs(path):
            kind, spec = doc["kind"], doc.get("spec") or {}
            where = f"{path.name} {kind}"
            if kind in ("Deployment", "StatefulSet", "Job"):
                pods.append(_template_pod(where, spec["template"]))
            elif kind == "CronJob":
                pods.append(_template_pod(where, spec["jobTemplate"]["spec"]["template"]))
            elif kind in ("RayJob", "RayCronJob"):
                job = spec["jobTemplate"] if kind == "RayCronJob" else spec
                assert "submitterPodTemplate" in job, f"{where}: KubeRay's own submitter pod is unconfined"
                pods.append(_template_pod(f"{where} submitter", job["submitterPodTemplate"], "ray-submitter"))
    for where, cluster in _ray_cluster_specs():
        autoscaled = cluster.get("enableInTreeAutoscaling") is True
        autoscaler = (cluster.get("autoscalerOptions") or {}) if autoscaled else None
        pods.append(_template_pod(f"{where} head", cluster["headGroupSpec"]["template"], "ray-head",
                                  autoscaler=autoscaler))
        for group in cluster.get("workerGroupSpecs", []):
            pods.append(_template_pod(f"{where} {group['groupName']}", group["template"], "ray-worker"))
    return pods


def _claims(docs: list) -> set[str]:
    """The volumes a StatefulSet's volumeClaimTemplates give its pods."""
    return {t["metadata"]["name"] for d in docs
            for t in (d.get("spec") or {}).get("volumeClaimTemplates", [])}


def test_every_pod_runs_as_non_root_without_privileges_on_a_read_only_root():
    pods = _pods()
    assert len(pods) >= 12, [p.where for p in pods]  # 4 workloads, 3 Ray clusters, 2 submitters
    claims = {c for path in K8S_FILES for c in _claims(_docs(path))}
    for pod in pods:
        context = pod.spec.get("securityContext") or {}
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0, pod.where
        assert (context.get("seccompProfile") or {}).get("type") == "RuntimeDefault", pod.where
        volumes = {v["name"] for v in pod.spec.get("volumes", [])} | claims
        for container in pod.containers:
            where, sc = f"{pod.where} {container['name']}", container.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add") and not sc.get("privileged"), where
            assert sc.get("runAsNonRoot") is not False and sc.get("runAsUser") != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root and no writable /tmp"
            if pod.role in ("ray-head", "ray-worker") and container["name"] != "autoscaler":
                assert "/home/ray/.cache" in mounts, f"{where}: models and caches go to ~/.cache"
            if pod.role == "postgres":
                assert "/var/run/postgresql" in mounts, f"{where}: the server's socket"
            assert set(mounts.values()) <= volumes, f"{where}: mounts a volume the pod lacks"


def test_no_pod_holds_a_kubernetes_api_token_but_an_autoscaled_ray_head():
    for pod in _pods():
        if pod.autoscaler is not None:  # its sidecar adds and removes workers through the API
            assert pod.spec.get("automountServiceAccountToken") is not False, pod.where
            # the account KubeRay makes for the head, bound to the autoscaler's Role alone
            assert "serviceAccountName" not in pod.spec, pod.where
        else:
            assert pod.spec.get("automountServiceAccountToken") is False, pod.where


def _matches(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        value, present = labels.get(e["key"]), e["key"] in labels
        ok = {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


@functools.cache  # read many times by one test; never changed
def _policies() -> tuple[dict, ...]:
    return tuple(d for path in K8S_FILES for d in _docs(path) if d["kind"] == "NetworkPolicy")


def _admits(dst: dict, port: int, src: dict, namespace: dict = NAMESPACE) -> bool:
    """Whether the NetworkPolicies let a pod labelled src, in a namespace labelled namespace, open
    a connection to port of a pod labelled dst in semvec's namespace (Kubernetes' own semantics)."""
    def peer_admits(peer: dict) -> bool:
        if "ipBlock" in peer:
            return False
        in_namespace = (_matches(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer
                        else namespace == NAMESPACE)
        return in_namespace and _matches(peer.get("podSelector") or {}, src)

    selecting = [p["spec"] for p in _policies() if _matches(p["spec"]["podSelector"], dst)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    return any((not rule.get("ports") or port in {p["port"] for p in rule["ports"]})
               and ("from" not in rule or any(peer_admits(peer) for peer in rule["from"]))
               for policy in selecting for rule in policy.get("ingress") or [])


def test_network_policies_admit_only_the_right_pods():
    pods = _pods()
    roles = {p.role: p.labels for p in pods}
    assert {"mlflow", "postgres", "mlflow-users", "retrain-submitter", "ray-submitter", "ray-head",
            "ray-worker"} <= set(roles), sorted(roles)
    assert not _admits({"app": "a pod no policy names"}, 80, roles["mlflow"]), "no default deny"

    def sources(dst: dict, port: int) -> set[str]:
        return {p.role for p in pods if _admits(dst, port, p.labels)}

    assert sources(roles["mlflow"], 5000) == {"ray-head", "ray-worker", "retrain-submitter", "mlflow-users"}
    assert sources(roles["postgres"], 5432) == {"mlflow"}
    for head in (p for p in pods if p.role == "ray-head"):
        for port in (8265, 6379, 10001):  # dashboard and job API, GCS, Ray client: this namespace only
            assert sources(head.labels, port) == set(roles), (head.where, port)
            assert not _admits(head.labels, port, *ELSEWHERE), (head.where, port)
        assert _admits(head.labels, 8265, *OPERATOR), f"{head.where}: KubeRay cannot read job status"
        assert not _admits(head.labels, 6379, *OPERATOR)
    for worker in (p for p in pods if p.role == "ray-worker"):
        assert sources(worker.labels, 10002) == {"ray-head", "ray-worker"}, worker.where
    for dst, port in ((roles["mlflow"], 5000), (roles["postgres"], 5432)):
        assert not _admits(dst, port, *ELSEWHERE) and not _admits(dst, port, *OPERATOR)


def _env(container: dict) -> dict[str, dict]:
    return {v["name"]: v for v in container.get("env") or []}


def _mlflow_pod() -> dict:
    deployment = next(d for d in _docs(K8S / "mlflow.yaml") if d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]


def _auth_script():
    path = ROOT / "infra" / "mlflow_auth.py"
    spec = importlib.util.spec_from_file_location("semvec_infra_mlflow_auth", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_runs_its_basic_auth_app_with_the_admin_from_a_secret(tmp_path, monkeypatch):
    pod = _mlflow_pod()
    server = next(c for c in pod["containers"] if c["name"] == "mlflow")
    command = server["command"]
    assert command[:2] == ["mlflow", "server"] and command[command.index("--app-name") + 1] == "basic-auth"
    env = _env(server)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": ADMIN, "key": name}, name
    # its config file: written at each start by the init container, into a memory-backed emptyDir
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    init = next(c for c in pod["initContainers"] if "/infra/mlflow_auth.py" in " ".join(c["command"]))
    workdir = re.findall(r"^\s*WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]
    assert init["command"][1:] == [f"{workdir}/infra/mlflow_auth.py", "ini", ini]
    volume = {v["name"]: v for v in pod["volumes"]}

    def volume_of(container: dict) -> str:
        return next(m["name"] for m in container["volumeMounts"] if ini.startswith(m["mountPath"] + "/"))

    assert volume_of(init) == volume_of(server)
    assert volume[volume_of(server)]["emptyDir"]["medium"] == "Memory"
    # users and grants in the tracking database: the init container sees the same URI, from a Secret
    assert _env(init)["MLFLOW_BACKEND_STORE_URI"] == env["MLFLOW_BACKEND_STORE_URI"]
    # what the file says: nothing visible without a grant; no admin password in it
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://mlflow:p%41ss@db:5432/mlflow")
    _auth_script().write_ini(tmp_path / "basic_auth.ini")
    config = configparser.ConfigParser()
    config.read(tmp_path / "basic_auth.ini")
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert config["mlflow"]["database_uri"] == "postgresql://mlflow:p%41ss@db:5432/mlflow"
    assert "admin_password" not in config["mlflow"]
    assert (tmp_path / "basic_auth.ini").stat().st_mode & 0o777 == 0o600


def _readme_secrets() -> set[tuple[str, str]]:
    """(Secret, key) for every `kubectl create secret generic` in the README's cluster section."""
    text = _readme_cluster_section().replace("\\\n", " ")
    found = set()
    for name, rest in re.findall(r"create secret generic ([\w-]+)([^\n]*)", text):
        found |= {(name, key) for key in re.findall(r"--from-literal=(\w+)=", rest)}
    return found


def test_every_credential_is_a_secret_key_ref_to_a_secret_the_readme_makes():
    made = _readme_secrets()
    for pod in _pods():
        for container in pod.containers:
            where = f"{pod.where} {container['name']}"
            for var in container.get("env") or []:
                if _sensitive(var["name"]) or var["name"].endswith("_USERNAME"):
                    ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                    assert ref and "value" not in var, f"{where}: {var['name']} is not from a Secret"
                    assert (ref["name"], ref["key"]) in made, f"{where}: the README makes no {ref}"
            for source in container.get("envFrom") or []:
                assert source["secretRef"]["name"] in {n for n, _ in made}, f"{where}: {source}"
    # the roles: backfills read, training and retraining write, the submitter's check reads
    expected = {"rayjob-backfill.yaml": READER, "raycluster.yaml": WRITER, "raycronjob-retrain.yaml": WRITER}
    for where, container in _ray_containers():
        env = _env(container)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": expected[where.split()[0]], "key": name}, where
    check = next(p for p in _pods() if p.role == "retrain-submitter").spec["initContainers"][0]
    assert _env(check)["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == READER


def test_the_users_job_and_the_check_name_what_the_jobs_use():
    from semvec.models import register_model
    from semvec.retrain.config import RetrainConfig

    retrain = yaml.safe_load((ROOT / "pipelines" / "configs" / "retrain.yaml").read_text())
    users = _env(next(p for p in _pods() if p.role == "mlflow-users").spec["containers"][0])
    models = users["SEMVEC_MLFLOW_MODELS"]["value"].split(",")
    experiments = set(users["SEMVEC_MLFLOW_EXPERIMENTS"]["value"].split(","))
    assert retrain["name"] in models
    defaults = {f.name: f.default for f in dataclasses.fields(RetrainConfig)}
    train = inspect.signature(register_model).parameters["experiment"].default  # train's too
    assert {retrain.get("experiment", defaults["experiment"]), train} <= experiments
    check = next(p for p in _pods() if p.role == "retrain-submitter").spec["initContainers"][0]
    assert check["command"][-2:] == ["check", retrain["name"]]


def test_nothing_reports_usage():
    image = dict(re.findall(r"^\s*(?:ENV\s+)?(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
    wanted = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
              "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    assert {k: image.get(k) for k in wanted} == wanted, "infra/Dockerfile"
    for pod in _pods():
        for container in pod.containers:
            if container.get("image", "").startswith(SEMVEC_IMAGE):
                env = {v["name"]: v.get("value") for v in container.get("env") or []}
                assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true", f"{pod.where} {container['name']}"
                if pod.role.startswith("ray-"):
                    assert env.get("RAY_USAGE_STATS_ENABLED") == "0", f"{pod.where} {container['name']}"
    for pod in _pods():  # KubeRay's autoscaler sidecar runs the head's image
        if pod.autoscaler is not None:
            off = {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}
            assert off in pod.autoscaler.get("env", []), pod.where


def test_a_retraining_round_ends_before_its_deadline_and_the_backfill_job_uses_the_champion():
    """The submitter's deadline (CronJob) or the RayJob's leaves a stuck round's driver running and
    renewing its lock, so every later night exits 3: the driver runs under `timeout`, ending first.
    The backfill RayJob is documented to embed with the champion and did not say which model."""
    import shlex

    for name in ("raycronjob-retrain.yaml", "cronjob-retrain.yaml"):
        path = next(p for p in YAML_FILES if p.name == name)
        for doc in _docs(path):
            deadlines = [n["activeDeadlineSeconds"] for n in _walk(doc)
                         if isinstance(n, dict) and "activeDeadlineSeconds" in n]
            commands = [shlex.split(n["entrypoint"]) for n in _walk(doc)
                        if isinstance(n, dict) and isinstance(n.get("entrypoint"), str)]
            commands += [[str(a) for a in n["command"]] for n in _walk(doc)
                         if isinstance(n, dict) and isinstance(n.get("command"), list)
                         and "-m" in n["command"]]
            retrain = [c for c in commands if "pipelines.retrain" in c]
            assert retrain and deadlines, name
            for argv in retrain:
                head = argv[:argv.index("python")]
                assert "timeout" in head, f"{name}: the round's driver has no timeout: {argv}"
                limit = int(head[-1]) + 60  # --kill-after=60
                assert limit < min(deadlines), f"{name}: timeout {limit} s is not within {min(deadlines)} s"
    backfill = next(p for p in YAML_FILES if p.name == "rayjob-backfill.yaml")
    entry = [n["entrypoint"] for d in _docs(backfill) for n in _walk(d)
             if isinstance(n, dict) and isinstance(n.get("entrypoint"), str)]
    assert entry and all("--model models:/semvec-sts@champion" in e for e in entry)

"""The deployment files agree with the repository: cluster.yaml, infra/Dockerfile, infra/k8s/*.yaml.

Nothing in CI starts a cluster from them, so these checks keep them honest: they parse, name entry
points and configs that exist, carry the Ray version pyproject.toml pins, keep the head free of work
and the GPU workers scaling from zero, keep Ray's token authentication on, and hold no secret value.
Fast: no network, no Ray.
"""

from __future__ import annotations

import re
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
                "cronjob-retrain.yaml", "mlflow.yaml"}

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
        assert found, f"{path.name} names no Ray version"
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

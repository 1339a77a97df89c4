"""Offline checks of the Kubernetes deployment in k8s/.

No cluster, Helm or Docker daemon is needed. The Kubernetes manifests are validated against the
API schemas that ship with kubernetes-validate. The Helm values, Dockerfiles, RBAC and example
Secrets are checked against each other and against pyproject.toml, so that a rename in one place
fails here rather than at deploy time.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"

# The oldest Kubernetes minor that the manifests promise to support, and the newest schema that
# kubernetes-validate ships. Both are bundled with the package, so validation needs no network.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

PLACEHOLDER = "CHANGE_ME"

# fsspec's driver package for each object-store URL scheme TULU_HOME may use.
FSSPEC_DRIVERS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


# -- loading ---------------------------------------------------------------------------------------
def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


@pytest.fixture(scope="module")
def rbac() -> dict[str, dict]:
    docs = load_documents(K8S / "rbac.yaml")
    kinds = [doc["kind"] for doc in docs]
    assert sorted(kinds) == ["Role", "RoleBinding", "ServiceAccount"], kinds
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict]:
    docs = load_documents(K8S / "secrets.example.yaml")
    assert all(doc["kind"] == "Secret" for doc in docs)
    return {doc["metadata"]["name"]: doc for doc in docs}


@pytest.fixture(scope="module")
def deployment(values) -> dict:
    user_deployments = values["dagster-user-deployments"]
    assert user_deployments["enabled"] is True
    deployments = user_deployments["deployments"]
    assert [d["name"] for d in deployments] == ["tulu-pipeline"]
    return deployments[0]


def pinned_version(pyproject: dict, package: str) -> str:
    """The exact version pyproject.toml pins for a dependency (``package==X``)."""
    for spec in pyproject["project"]["dependencies"]:
        requirement = Requirement(spec)
        if requirement.name == package:
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{package} is not pinned exactly: {spec}"
            return specifier.version
    raise AssertionError(f"{package} is not a dependency in pyproject.toml")


def env_entries(deployment: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in deployment["env"]}


def env_value(deployment: dict, name: str) -> str:
    return env_entries(deployment)[name]["value"]


# -- (a) Kubernetes schema validation ----------------------------------------------------------
def kubernetes_validate_cli() -> str:
    beside_python = Path(sys.executable).with_name("kubernetes-validate")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("kubernetes-validate")
    if not found:
        pytest.fail("kubernetes-validate is not installed: it is in the `dev` extra (pip install -e '.[dev]')")
    return found


def run_kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    command = [kubernetes_validate_cli(), "--strict"]
    for version in KUBERNETES_VERSIONS:
        command += ["--kubernetes-version", version]
    return subprocess.run([*command, str(path)], check=False, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("manifest", ["rbac.yaml", "secrets.example.yaml", "tulu-home-pvc.example.yaml"])
def test_manifest_validates_strictly_against_kubernetes_schemas(manifest):
    path = K8S / manifest
    result = run_kubernetes_validate(path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # kubernetes-validate exits 0 with only a WARN when it has no schema for a kind or apiVersion
    # (a typo would do that), so every resource must have its own "passed" line for every version.
    assert "WARN" not in output, output
    for doc in load_documents(path):
        resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        for version in KUBERNETES_VERSIONS:
            minor = ".".join(version.split(".")[:2])
            assert f"passed for resource {resource} against version {minor}" in output, output


def test_strict_validation_rejects_an_unknown_field(tmp_path, rbac):
    """The validation above means something: a misspelt field in a Role fails in strict mode."""
    role = copy.deepcopy(rbac["Role"])
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    broken = tmp_path / "role.yaml"
    broken.write_text(yaml.safe_dump(role))
    result = run_kubernetes_validate(broken)
    assert result.returncode != 0
    assert "did not validate" in result.stdout


# -- RBAC --------------------------------------------------------------------------------------
def dagster_k8s_api_calls() -> set[tuple[str, str]]:
    """(verb, resource) for every namespaced Kubernetes API call in the installed dagster-k8s source and in
    the compute launcher (resources/)."""
    spec = importlib.util.find_spec("dagster_k8s")
    assert spec is not None and spec.origin, "dagster-k8s is not installed"
    verbs = {"create": "create", "read": "get", "list": "list", "delete": "delete", "patch": "patch",
             "replace": "update"}
    resources = {
        "job": "jobs",
        "job_status": "jobs/status",
        "pod": "pods",
        "pod_log": "pods/log",
        "pod_status": "pods/status",
        "event": "events",
        "service": "services",
        "config_map": "configmaps",
        "secret": "secrets",
    }
    calls = set()
    pattern = re.compile(r"_api\.(create|read|list|delete|patch|replace)_namespaced_([a-z_]+)")
    for source in [*Path(spec.origin).parent.rglob("*.py"), *(ROOT / "resources").glob("*.py")]:
        for method, kind in pattern.findall(source.read_text()):
            assert kind in resources, f"{source.name} calls {method}_namespaced_{kind}: map it to an RBAC resource here"
            calls.add((verbs[method], resources[kind]))
    return calls


def granted(role: dict) -> set[tuple[str, str, str]]:
    """(api group, resource, verb) triples the Role grants without a resourceNames restriction."""
    triples = set()
    for rule in role["rules"]:
        if rule.get("resourceNames"):
            continue
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    triples.add((group, resource, verb))
    return triples


def api_group(resource: str) -> str:
    return "batch" if resource.split("/")[0] == "jobs" else ""


def test_role_grants_every_api_call_dagster_k8s_makes(rbac):
    calls = dagster_k8s_api_calls()
    # Sanity check on the scan itself: these are the launchers' and Pipes' core calls, and the compute
    # launcher's own (it reads its Jobs and creates multi-node Services).
    assert {("create", "jobs"), ("get", "jobs/status"), ("create", "pods"), ("get", "pods/log")} <= calls
    assert {("get", "jobs"), ("create", "services"), ("delete", "services"), ("list", "events")} <= calls
    grants = granted(rbac["Role"])
    missing = sorted(
        (verb, resource) for verb, resource in calls if (api_group(resource), resource, verb) not in grants
    )
    assert not missing, f"the Role lacks what dagster-k8s calls: {missing}"


def test_role_grants_the_documented_permissions_and_no_wildcards(rbac):
    role = rbac["Role"]
    grants = granted(role)
    required = {
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"create", "get", "list", "watch", "delete"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"list", "watch"},
        ("", "services"): {"create", "get", "delete"},
        ("", "configmaps"): {"get"},
    }
    for (group, resource), verbs in required.items():
        for verb in verbs:
            assert (group, resource, verb) in grants, (group, resource, verb)
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
    # Secrets are readable only by name, never the whole namespace's.
    secret_rules = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    assert secret_rules and all(rule.get("resourceNames") and rule["verbs"] == ["get"] for rule in secret_rules)


def test_role_binding_ties_the_service_account_to_the_role(rbac, values):
    account, role, binding = rbac["ServiceAccount"], rbac["Role"], rbac["RoleBinding"]
    namespace = account["metadata"]["namespace"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["roleRef"] == role_ref
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}
    assert binding["subjects"] == [subject]
    # The chart runs every pod as this account, and creates neither it nor a Role of its own.
    assert account["metadata"]["name"] == "tulu-pipeline"
    assert values["global"]["serviceAccountName"] == account["metadata"]["name"]
    assert values["serviceAccount"]["create"] is False
    assert values["dagster-user-deployments"]["serviceAccount"]["create"] is False
    assert values["rbacEnabled"] is False and values["dagster-user-deployments"]["rbacEnabled"] is False


# -- (b) Helm values ---------------------------------------------------------------------------
def test_values_define_the_tulu_code_location(values, deployment, pyproject):
    module = pyproject["tool"]["dagster"]["module_name"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", module] == ["-m", "definitions"]
    assert isinstance(deployment["port"], int)
    assert deployment["image"]["repository"] == "tulu-pipeline/code"
    tag = str(deployment["image"]["tag"])
    assert tag and tag != "latest", "run pods must get the exact image the code server reports"
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}, "run pods need TULU_HOME and the credentials"
    assert deployment["podSecurityContext"]["runAsNonRoot"] is True


def test_values_point_tulu_at_the_object_store_in_k8s_mode(deployment):
    assert env_value(deployment, "TULU_DEPLOYMENT") == "k8s"
    home = urlparse(env_value(deployment, "TULU_HOME"))
    assert home.scheme in FSSPEC_DRIVERS and home.netloc, "TULU_HOME must be an object-store URL, not a pod-local path"
    assert {"name": "tulu-object-store"} in deployment["envSecrets"]


def test_values_trainer_image_is_built_with_the_same_tag(deployment):
    repository, _, tag = env_value(deployment, "TULU_TRAINER_IMAGE").rpartition(":")
    assert repository == "tulu-pipeline/trainer"
    assert tag == str(deployment["image"]["tag"])


def test_values_use_k8s_run_launcher(values):
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    assert launcher["config"]["k8sRunLauncher"]["loadInclusterConfig"] is True
    assert values["dagsterDaemon"]["enabled"] is True
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"


def test_values_use_external_postgres_with_password_from_secret(values, secrets):
    postgres = values["postgresql"]
    assert postgres["enabled"] is False and postgres["postgresqlHost"]
    assert postgres["postgresqlPassword"] == ""
    assert values["generatePostgresqlPasswordSecret"] is False
    # The chart reads DAGSTER_PG_PASSWORD from this Secret's `postgresql-password` key.
    secret = secrets[values["global"]["postgresqlSecretName"]]
    assert "postgresql-password" in secret["stringData"]


def test_chart_version_matches_pinned_dagster(pyproject):
    dagster = pinned_version(pyproject, "dagster")
    for doc in ("values.yaml", "README.md"):
        versions = re.findall(r"helm upgrade --install tulu dagster/dagster --version (\S+)", (K8S / doc).read_text())
        assert versions == [dagster], doc


SENSITIVE_NAME = re.compile(r"(?i)(password|passwd|secret[_-]?access|secret[_-]?key|api[_-]?key|token|credential)")
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
INLINE_PASSWORD = re.compile(r"(?i)password\s*[:=]\s*\S")


def plaintext_secrets(node, path: tuple = ()) -> Iterator[str]:
    """Where a document holds something secret as a literal instead of a reference to a Secret."""
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and SENSITIVE_NAME.search(name) and node.get("value") not in (None, ""):
            yield ".".join(map(str, (*path, name))) + " (env var with a literal value; use valueFrom)"
        for key, child in node.items():
            literal = isinstance(child, (str, int)) and not isinstance(child, bool) and str(child) != ""
            if literal and SENSITIVE_NAME.search(str(key)):
                yield ".".join(map(str, (*path, key)))
            yield from plaintext_secrets(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from plaintext_secrets(child, (*path, index))
    elif isinstance(node, str) and (CREDENTIALS_IN_URL.search(node) or INLINE_PASSWORD.search(node)):
        yield ".".join(map(str, path)) + " (credentials inside a string)"


def test_secret_scan_catches_literal_secrets():
    """The scan used below is not vacuous: each kind of leak is reported."""
    leaks = {
        "postgresql": {"postgresqlPassword": "hunter2"},
        "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}, {"name": "TULU_JUDGE_API_KEY", "value": "sk-1"}],
        "dsn": "postgresql://dagster:hunter2@db:5432/dagster",
        "args": ["--config", "password: hunter2"],
    }
    assert len(list(plaintext_secrets(leaks))) == 5


def test_values_hold_no_plaintext_secrets(values, deployment):
    assert list(plaintext_secrets(values)) == []
    # Sensitive env vars are references into Secrets, never literal values.
    judge = env_entries(deployment)["TULU_JUDGE_API_KEY"]
    assert "value" not in judge and judge["valueFrom"]["secretKeyRef"]["optional"] is True


def test_every_secret_the_values_reference_exists_and_is_readable(values, deployment, secrets, rbac):
    referenced: dict[str, set[str]] = {values["global"]["postgresqlSecretName"]: {"postgresql-password"}}
    for source in deployment["envSecrets"]:
        referenced.setdefault(source["name"], set())
    for entry in deployment["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            referenced.setdefault(ref["name"], set()).add(ref["key"])
    for name, keys in referenced.items():
        assert name in secrets, f"values.yaml references Secret {name!r}, which secrets.example.yaml does not define"
        assert keys <= set(secrets[name]["stringData"]), (name, keys)
    secret_rules = [rule for rule in rbac["Role"]["rules"] if "secrets" in rule["resources"]]
    readable = {name for rule in secret_rules for name in rule["resourceNames"]}
    assert set(referenced) <= readable == set(secrets)


def test_example_secrets_hold_only_placeholders(secrets, rbac):
    namespace = rbac["ServiceAccount"]["metadata"]["namespace"]
    for name, secret in secrets.items():
        assert secret["metadata"]["namespace"] == namespace
        assert "data" not in secret, f"{name}: use stringData placeholders, not base64 data"
        assert secret["stringData"] and all(value == PLACEHOLDER for value in secret["stringData"].values()), name
    assert set(secrets["tulu-object-store"]["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# -- (c) Dockerfiles ---------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a line continuation"
    return instructions


def arguments_of(instructions, keyword: str) -> list[str]:
    return [arguments for name, arguments in instructions if name == keyword]


def index_of_run(instructions, predicate) -> int:
    matches = [
        i for i, (name, arguments) in enumerate(instructions) if name == "RUN" and predicate(shlex.split(arguments))
    ]
    assert len(matches) == 1, f"expected exactly one matching RUN, found {len(matches)}"
    return matches[0]


def pip_installs(tokens: list[str], *wanted: str) -> bool:
    """Whether one of the `&&`-joined commands of a RUN is `pip install` with all of `wanted` as arguments."""
    command: list[str] = []
    for token in [*tokens, "&&"]:
        if token != "&&":
            command.append(token)
            continue
        if command[:2] == ["pip", "install"] and all(w in command[2:] for w in wanted):
            return True
        command = []
    return False


def env_of(instructions) -> dict[str, str]:
    env = {}
    for arguments in arguments_of(instructions, "ENV"):
        for assignment in shlex.split(arguments):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


def source_copy_destination(instructions) -> str:
    (copy_args,) = [a for a in arguments_of(instructions, "COPY") if a.split()[0] == "."]
    return copy_args.split()[1]


@pytest.fixture(scope="module")
def code_image() -> list[tuple[str, str]]:
    return dockerfile_instructions(K8S / "Dockerfile.code")


@pytest.fixture(scope="module")
def trainer_image() -> list[tuple[str, str]]:
    return dockerfile_instructions(K8S / "Dockerfile.trainer")


def test_code_image_uses_a_python_that_pyproject_allows(code_image, pyproject):
    (base,) = arguments_of(code_image, "FROM")
    match = re.fullmatch(r"python:(\d+\.\d+)-slim", base)
    assert match, base
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(match.group(1))


def test_code_image_installs_pinned_cpu_torch_before_the_repo(code_image, pyproject):
    torch = f"torch=={pinned_version(pyproject, 'torch')}"
    cpu_index = "https://download.pytorch.org/whl/cpu"
    torch_run = index_of_run(code_image, lambda t: pip_installs(t, torch, "--index-url", cpu_index))
    source = source_copy_destination(code_image)
    repo_run = index_of_run(code_image, lambda t: pip_installs(t, source))
    assert torch_run < repo_run, "CPU torch must be installed first, or `pip install .` pulls the CUDA build"


def test_trainer_image_installs_cuda_torch_and_the_gpu_extra(trainer_image, pyproject):
    gpu_extra = pyproject["project"]["optional-dependencies"]["gpu"]
    assert any(Requirement(spec).name == "vllm" for spec in gpu_extra)
    torch = f"torch=={pinned_version(pyproject, 'torch')}"
    torch_run = index_of_run(trainer_image, lambda t: pip_installs(t, torch))
    assert "--index-url" not in shlex.split(trainer_image[torch_run][1]), "the trainer needs the CUDA build from PyPI"
    source = source_copy_destination(trainer_image)
    repo_run = index_of_run(trainer_image, lambda t: pip_installs(t, f"{source}[gpu]"))
    assert torch_run < repo_run


def test_trainer_image_has_a_pinned_cuda_base_and_an_allowed_python(trainer_image, pyproject):
    (base,) = arguments_of(trainer_image, "FROM")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?(base|runtime)-ubuntu\d+\.\d+", base), base
    apt = next(a for a in arguments_of(trainer_image, "RUN") if "apt-get install" in a)
    (python,) = set(re.findall(r"\bpython(\d+\.\d+)", apt))  # python3.11, python3.11-venv, ...
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(python)
    assert arguments_of(trainer_image, "ENTRYPOINT") == ['["python"]']


@pytest.mark.parametrize("image", ["code_image", "trainer_image"])
def test_images_run_as_a_numeric_non_root_user(image, request):
    instructions = request.getfixturevalue(image)
    user = arguments_of(instructions, "USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, user
    runs = arguments_of(instructions, "RUN")
    assert any(f"--uid {user}" in arguments for arguments in runs), "the uid is never created"


@pytest.mark.parametrize("image", ["code_image", "trainer_image"])
def test_images_install_the_fsspec_driver_for_tulu_home(image, request, deployment):
    instructions = request.getfixturevalue(image)
    scheme = urlparse(env_value(deployment, "TULU_HOME")).scheme
    args = dict(arg.partition("=")[::2] for arg in arguments_of(instructions, "ARG"))
    packages = args["OBJECT_STORE_PACKAGES"].strip('"')
    assert FSSPEC_DRIVERS[scheme] in packages.split()
    index_of_run(instructions, lambda t: pip_installs(t, "${OBJECT_STORE_PACKAGES}"))


def test_code_image_serves_what_the_chart_expects(code_image, values, deployment):
    port = deployment["port"]
    assert str(port) in arguments_of(code_image, "EXPOSE")
    (cmd,) = arguments_of(code_image, "CMD")
    # The chart starts the container with exactly these args; the image's default must agree.
    chart_args = ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(port), *deployment["dagsterApiGrpcArgs"]]
    assert json.loads(cmd) == chart_args
    assert arguments_of(code_image, "ENTRYPOINT") == [], "the chart's args would be passed to an ENTRYPOINT"
    assert env_of(code_image)["DAGSTER_HOME"] == values["global"]["dagsterHome"]


# -- build context -------------------------------------------------------------------------------
def ignore_patterns(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_build_context(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            included = negated
    return included


def test_both_images_share_one_build_context_filter():
    code, trainer = (ignore_patterns(K8S / f"Dockerfile.{image}.dockerignore") for image in ("code", "trainer"))
    assert code == trainer


def test_build_context_holds_what_pip_install_needs_and_nothing_local(pyproject):
    patterns = ignore_patterns(K8S / "Dockerfile.code.dockerignore")
    setuptools = pyproject["tool"]["setuptools"]
    needed = ["pyproject.toml", pyproject["project"]["readme"], "tulu_pipeline/data/sources.yaml"]
    needed += [f"{module}.py" for module in setuptools["py-modules"]]
    needed += [f"{include.rstrip('*')}/__init__.py" for include in setuptools["packages"]["find"]["include"]]
    for path in needed:
        assert in_build_context(path, patterns), f"{path} is excluded from the image build"
    for path in [".venv/bin/python", ".git/config", ".tulu/data/x/part-0.parquet", ".env",
                 "tulu_pipeline/__pycache__/settings.cpython-311.pyc", "tests/test_k8s_manifests.py"]:
        assert not in_build_context(path, patterns), f"{path} would be sent into the image build"


# -- the compute launcher's GPU Jobs, as the values configure them ------------------------------------------
@pytest.fixture
def values_launcher(deployment, monkeypatch):
    """The K8sLauncher that resources_for("k8s") builds from the values' env."""
    from resources import k8s_launcher_from_env

    for name, entry in env_entries(deployment).items():
        if "value" in entry:
            monkeypatch.setenv(name, str(entry["value"]))
    return k8s_launcher_from_env()


def test_values_configure_the_gpu_launcher(values_launcher, deployment, secrets, rbac):
    launcher = values_launcher
    assert launcher.image == env_value(deployment, "TULU_TRAINER_IMAGE")
    assert launcher.namespace == rbac["ServiceAccount"]["metadata"]["namespace"]
    assert launcher.service_account == rbac["ServiceAccount"]["metadata"]["name"]
    assert set(launcher.env_secrets) <= set(secrets), "GPU pods would wait on a Secret that is never created"
    for name, ref in launcher.secret_env.items():
        secret, _, key = ref.partition("/")
        assert key in secrets[secret]["stringData"], (name, ref)
    assert set(launcher.profiles) <= {"train", "generate", "eval"}
    for kind in ("train", "generate", "eval"):
        spec = launcher.gpu_spec(kind)
        assert spec.gpus >= 1 and spec.tolerations and spec.node_selector, kind
        assert spec.backoff_limit == 0 and spec.active_deadline_seconds > 0, kind


def test_gpu_jobs_rendered_from_the_values_validate_strictly(values_launcher, tmp_path):
    from resources.k8s_spec import job_name

    documents = []
    for index, (kind, nodes) in enumerate([("train", 1), ("train", 2), ("generate", 1), ("eval", 1)]):
        spec = values_launcher.gpu_spec(kind, nodes=nodes)
        name = job_name(kind, f"{index:08d}", "stage")
        job, service = values_launcher.manifests(name, kind, spec, "tulu_pipeline.training.sft_job",
                                                 {"DAGSTER_PIPES_CONTEXT": "x", "DAGSTER_PIPES_MESSAGES": "y"})
        documents += [job] + ([service] if service else [])
    path = tmp_path / "gpu-jobs.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    result = run_kubernetes_validate(path)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output, output
    assert output.count("passed for resource") == len(documents) * len(KUBERNETES_VERSIONS), output


def test_values_limit_gpu_work_in_the_run_queue_and_the_gpu_pool(values):
    from assets.automation import GPU_POOL

    limits = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert {"key": "tulu/compute", "value": "gpu", "limit": limits[0]["limit"]} in limits and limits[0]["limit"] >= 1
    concurrency = values["concurrency"]
    assert concurrency["enabled"] is True and concurrency["pools"]["granularity"] == "op"
    assert concurrency["pools"]["defaultLimit"] >= 1
    # The chart refuses run limits in both places.
    assert "runs" not in concurrency
    assert f"dagster instance concurrency set {GPU_POOL} " in (K8S / "values.yaml").read_text()


def test_readme_deploy_section_is_complete():
    readme = (K8S / "README.md").read_text()
    assert readme.startswith("# Deploy on Kubernetes")
    for path in re.findall(r"kubectl apply -f (k8s/[\w.-]+\.yaml)", readme):
        assert (ROOT / path).exists(), path
    for path in re.findall(r"-f (k8s/Dockerfile\.\w+)", readme):
        assert (ROOT / path).exists(), path
    for name in ("TULU_K8S_LAUNCHER", "TULU_TRAINER_IMAGE", "tulu-judge", "nvidia.com/gpu", "OOMKilled"):
        assert name in readme, name
